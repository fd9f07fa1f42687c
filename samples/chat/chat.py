#!/usr/bin/env python3
"""Sample terminal chat over the ucm-trt generation runtime (same app as ``ucm-trt chat``).

    python samples/chat/chat.py [--algorithm esa] [--budget 0.25] [--load essay.txt] ...
    printf 'Hi\n/algo esa\nWhat did I say?\n' | python samples/chat/chat.py --max-new-tokens 16

See samples/chat/README.md. The logic lives in the package (ucm_trt.chat.app); this file only
makes the repository checkout runnable without installing the package.
"""

import sys
from pathlib import Path

try:
    import ucm_trt  # noqa: F401
except ModuleNotFoundError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))

from ucm_trt.chat.app import main

if __name__ == "__main__":
    sys.exit(main(prog="chat.py"))
