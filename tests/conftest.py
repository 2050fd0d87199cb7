import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# tiktoken's GPT-2 files ship in ../shared/tiktoken-cache on the project's machines: work offline.
_cache = os.path.join(os.path.dirname(ROOT), "shared", "tiktoken-cache")
if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(_cache):
    os.environ["TIKTOKEN_CACHE_DIR"] = _cache

# What every test that starts a process gives it: the CPU alone (no CUDA device visible, gloo between processes),
# so that the suite runs alike on a machine with no GPU, one or eight (a test that means a GPU says so).
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": "", "TRAIN_BACKEND": "gloo"}

_BPE = {}


def gpt2_bpe_missing():
    """Why GPT-2's BPE cannot be loaded here (None when it can): a fresh clone offline has no tiktoken cache."""
    if "why" not in _BPE:
        from machinery.tokenizer import gpt2_tokenizer
        try:
            gpt2_tokenizer()
            _BPE["why"] = None
        except RuntimeError as e:
            _BPE["why"] = f"needs GPT-2's BPE files: {e}"
    return _BPE["why"]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpt2_bpe: the test tokenizes with GPT-2's BPE (tiktoken's two files); "
                                       "it skips, saying why, where they cannot be loaded")
    config.addinivalue_line("markers", "multiprocess: the test starts train.py under torchrun (2 gloo processes on "
                                       "the CPU, several seconds each); `-m 'not multiprocess'` leaves them out "
                                       "locally, CI runs them")


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpt2_bpe") and gpt2_bpe_missing():
        pytest.skip(gpt2_bpe_missing())
