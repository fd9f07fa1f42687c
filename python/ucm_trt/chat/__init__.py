"""The sample chat app's library part: a chat session over the generation runtime, its slash
commands, the terminal loop behind ``ucm-trt chat``, and the passkey side-by-side demo.

- :class:`ChatSession` / :class:`ChatSettings` / :class:`TurnStats`: multi-turn chat with the
  model's chat template, switchable algorithm and budget, per-turn stats.
- :mod:`ucm_trt.chat.app`: the terminal app (``ucm-trt chat``, ``samples/chat/chat.py``).
- :func:`ucm_trt.chat.prepare.prepare_onnx`: export + rewrite a model once for the ONNX Runtime
  backend (the chat's default backend on the CPU).
- :func:`ucm_trt.chat.demo_passkey.passkey_side_by_side`: dense vs sparse on a buried passkey.

Importing this package is cheap; torch and transformers load when a session or the app starts.
"""

from ucm_trt.chat.session import ChatError, ChatSession, ChatSettings, DocumentInfo, TurnResult, TurnStats

__all__ = ["ChatError", "ChatSession", "ChatSettings", "DocumentInfo", "TurnResult", "TurnStats"]
