"""
What the data sets' prepare.py scripts share: one careful download (gpt.py's weight loader uses it
too), an atomic JSON writer, and the check of --out_dir.

A download is streamed to `<dest>.part` and renamed onto `dest` only once it is complete and its size is
right, so a crash, a cut connection or a bad server never leaves a half file where a good one is expected.
"""
import json
import os
import sys
import time

import requests


def download(url, dest, expected_size=None, chunk_size=1 << 20, timeout=60, headers=None):
    """Fetch url into dest (atomically) unless dest already exists. Returns dest. A failed download
    leaves nothing behind: no part file, and none of the folders it made for dest. headers: extra request
    headers (a gated hub repo's Authorization)."""
    if os.path.exists(dest):
        return dest
    tmp, made = dest + ".part", []
    try:
        # identity: the byte counts below are then the file's own (a gzipped body would be counted twice over)
        with requests.get(url, stream=True, timeout=timeout, headers={"Accept-Encoding": "identity", **(headers or {})}) as r:
            if r.status_code != 200:
                raise RuntimeError(f"download of {url} failed: HTTP {r.status_code}")
            # Content-Length is what the server promised; fall back on the caller's expectation.
            total = expected_size or (None if r.headers.get("Content-Encoding") else int(r.headers.get("Content-Length") or 0))
            done, t0, last = 0, time.time(), 0.0
            made = make_dirs(os.path.dirname(os.path.abspath(dest)))  # only now: a refused request makes none
            with open(tmp, "wb") as f:
                for chunk in r.iter_content(chunk_size):
                    f.write(chunk)
                    done += len(chunk)
                    if time.time() - last > 1.0:  # one progress line a second at most
                        last = time.time()
                        pct = f"{100 * done / total:5.1f}%" if total else ""
                        progress(f"{os.path.basename(dest)}: {done / 1e6:8.1f} MB {pct} "
                                 f"{done / 1e6 / max(last - t0, 1e-9):6.1f} MB/s")
        progress_done()
        promised = int(r.headers.get("Content-Length") or 0)
        if promised and r.raw.tell() != promised:  # bytes on the wire, compressed or not
            raise RuntimeError(f"download of {url} is incomplete: got {r.raw.tell()} bytes, expected {promised}")
        if expected_size and done != expected_size:
            raise RuntimeError(f"download of {url} has {done} bytes, expected {expected_size}")
        os.replace(tmp, dest)
        return dest
    except requests.RequestException as e:
        raise RuntimeError(f"download of {url} failed: {type(e).__name__}: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        if not os.path.exists(dest):
            for d in made:  # deepest first; a folder something else has put a file in stays
                try:
                    os.rmdir(d)
                except OSError:
                    break


def make_dirs(path):
    """os.makedirs(path), returning the folders it created, deepest first (to remove them again)."""
    made = []
    while path and not os.path.exists(path):
        made.append(path)
        path = os.path.dirname(path)
    if made:
        os.makedirs(made[0], exist_ok=True)
    return made


_PROGRESS = {"open": False}


def progress(line):
    """A progress line on stderr: rewritten in place on a terminal, one plain line each in a log file."""
    if sys.stderr.isatty():
        print(f"\r{line}", end="", file=sys.stderr, flush=True)
        _PROGRESS["open"] = True
    else:
        print(line, file=sys.stderr, flush=True)


def progress_done():
    """Ends a line that progress() has been rewriting on a terminal."""
    if _PROGRESS["open"]:
        print(file=sys.stderr)
        _PROGRESS["open"] = False


def save_json(records, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(records, f)
    os.replace(tmp, path)  # readers never see a half-written file


def distinct_records(make, n, key, seen):
    """n records from make(), skipping any whose key(record) is already in seen, which grows: a question in
    two splits would leak its answer. make's errors pass through."""
    out = []
    while len(out) < n:
        r = make()
        if key(r) not in seen:
            seen.add(key(r))
            out.append(r)
    return out


def make_out_dir(parser, path):
    """Create --out_dir, or end with the parser's one-line usage error."""
    if os.path.exists(path) and not os.path.isdir(path):
        parser.error(f"--out_dir {path} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        parser.error(f"cannot create --out_dir {path}: {e.strerror}")
