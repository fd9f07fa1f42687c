import dataclasses

import pytest

from ucm_trt.config import (
    BlendConfig,
    Budget,
    GSAOnDeviceConfig,
    KVStarConfig,
    ReRoPEConfig,
    SparseConfig,
)


def test_defaults_are_valid_and_frozen():
    cfg = SparseConfig()
    assert cfg.forced_blocks == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.block_size = 64  # type: ignore[misc]
    with pytest.raises(TypeError):
        SparseConfig(128)  # type: ignore[misc]  # keyword-only


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"block_size": 100}, "block_size must be a power of two, got 100"),
        ({"block_size": 0}, "block_size must be >= 1, got 0"),
        ({"sink_blocks": -1}, "sink_blocks must be >= 0, got -1"),
        ({"local_blocks": 0}, "local_blocks must be >= 1, got 0"),
        ({"min_blocks": 0}, "min_blocks must be >= 1"),
        ({"representation": "max"}, "representation must be one of"),
        ({"scoring": "hamming"}, "scoring='hamming' reads representation"),
        ({"selection": "both"}, "selection must be one of"),
        ({"retrieval_stride": 0}, "retrieval_stride must be >= 1"),
    ],
)
def test_sparse_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseConfig(**kwargs)


def test_sparse_config_type_errors():
    with pytest.raises(TypeError, match="SparseConfig.budget must be a Budget"):
        SparseConfig(budget=0.3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="block_size must be an int"):
        SparseConfig(block_size=64.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="block_size must be an int"):
        SparseConfig(block_size=True)  # type: ignore[arg-type]


def test_budget():
    assert Budget.top_k(5).num_blocks(3) == 3
    assert Budget.ratio(0.3).num_blocks(247) == 74  # upstream ESA example: 32K prompt, bs 128
    assert Budget.ratio(0.01).num_blocks(10) == 1
    assert Budget.ratio(0.5).num_blocks(0) == 0
    assert Budget.mass(0.9).num_blocks(10) is None
    with pytest.raises(ValueError, match=r"Budget.value must be in \(0, 1\], got 1.5"):
        Budget.ratio(1.5)
    with pytest.raises(ValueError, match="Budget.value must be >= 1"):
        Budget.top_k(0)
    with pytest.raises(TypeError, match="Budget.value must be an int"):
        Budget.top_k(2.5)
    with pytest.raises(ValueError, match="finite"):
        Budget.threshold(float("nan"))
    with pytest.raises(ValueError, match="Budget.kind"):
        Budget(kind="all", value=1)


def test_rerope_config():
    cfg = ReRoPEConfig(window=512, training_length=8192)
    assert cfg.logn_training_length == 8192
    assert ReRoPEConfig(window=512, training_length=8192, logn=False).logn_training_length is None
    with pytest.raises(ValueError, match="window .* must be <= training_length"):
        ReRoPEConfig(window=9000, training_length=8192)
    with pytest.raises(ValueError, match="training_length must be >= 2"):
        ReRoPEConfig(window=1, training_length=1)
    with pytest.raises(TypeError, match="logn must be a bool"):
        ReRoPEConfig(window=1, training_length=8, logn=1)  # type: ignore[arg-type]


def test_kvstar_config():
    cfg = KVStarConfig()
    assert cfg.kept_channels(128) == 32
    cfg.check_block_size(128)
    with pytest.raises(ValueError, match="token_merge \\(3\\) must divide block_size \\(128\\)"):
        KVStarConfig(token_merge=3).check_block_size(128)
    with pytest.raises(ValueError, match="channel_ratio must be in"):
        KVStarConfig(channel_ratio=0.0)


def test_blend_config():
    BlendConfig(recompute_ratio=0.0).check_num_layers(2)
    with pytest.raises(ValueError, match="recompute_layer must be < num_layers"):
        BlendConfig(recompute_layer=4).check_num_layers(4)
    with pytest.raises(ValueError, match="recompute_ratio must be in \\[0, 1\\]"):
        BlendConfig(recompute_ratio=1.2)


def test_gsa_on_device_config():
    cfg = GSAOnDeviceConfig(rollback_layers=(0, 1), layer_reuse={5: 3, 4: 3})
    assert list(cfg.layer_reuse) == [4, 5]
    assert cfg.resolved_hash_bits(64) == 64
    assert cfg.gate_open([4096]) and not GSAOnDeviceConfig(concurrency_threshold=2).gate_open([4096, 10])
    with pytest.raises(ValueError, match="hash_bits must be a multiple of 8"):
        GSAOnDeviceConfig(hash_bits=60)
    # hash width per head-dim channel: None = 1 (upstream's head_dim bits); exclusive with hash_bits
    assert GSAOnDeviceConfig(hash_bits_per_dim=4).resolved_hash_bits(64) == 256
    assert GSAOnDeviceConfig(hash_bits_per_dim=2).resolved_hash_bits(80) == 160
    assert GSAOnDeviceConfig(hash_bits=96).resolved_hash_bits(64) == 96
    with pytest.raises(ValueError, match="hash_bits_per_dim must be"):
        GSAOnDeviceConfig(hash_bits_per_dim=0)
    with pytest.raises(ValueError, match="not both"):
        GSAOnDeviceConfig(hash_bits=64, hash_bits_per_dim=2)
    assert GSAOnDeviceConfig(hash_bits_per_dim=3).resolved_hash_bits(36) == 108  # refused at bind (not bytes)
    with pytest.raises(ValueError, match="only reuse an earlier layer"):
        GSAOnDeviceConfig(layer_reuse={3: 3})
    with pytest.raises(ValueError, match="itself reuses"):
        GSAOnDeviceConfig(layer_reuse={3: 2, 2: 1})
    with pytest.raises(ValueError, match="rollback"):
        GSAOnDeviceConfig(rollback_layers=(1,), layer_reuse={3: 1})
    with pytest.raises(ValueError, match="must not repeat"):
        GSAOnDeviceConfig(rollback_layers=(1, 1))
    with pytest.raises(TypeError, match="rollback_layers must be a tuple"):
        GSAOnDeviceConfig(rollback_layers=[0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="model has 4 layers"):
        GSAOnDeviceConfig(rollback_layers=(5,)).check_num_layers(4)
