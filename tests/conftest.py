import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# tiktoken's GPT-2 files ship in ../shared/tiktoken-cache on the project's machines: work offline.
_cache = os.path.join(os.path.dirname(ROOT), "shared", "tiktoken-cache")
if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(_cache):
    os.environ["TIKTOKEN_CACHE_DIR"] = _cache
