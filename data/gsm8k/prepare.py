"""
GSM8k-Aug: data/gsm8k/{train,valid,test}.json from the iCoT text files (385,620 / 500 / 1,319 lines).

The files come from da03/Internalize_CoT_Step_by_Step at a fixed commit (train.txt is a Git LFS file, so
it is served from media.githubusercontent.com, the other two from raw.githubusercontent.com). One line:

    Tom has 3 apples and buys 2 more. How many?||<<3+2=5>> #### 5

becomes {"question": "Tom has 3 apples and buys 2 more. How many?", "steps": ["<<3+2=5>>"], "answer": "5"},
by the official rule, kept record for record, quirks included (see convert_lines). The .txt files stay
next to the .json ones, so a second run downloads nothing.

    python data/gsm8k/prepare.py
    python data/gsm8k/prepare.py --out_dir /tmp/gsm8k
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from machinery.argparser import Parser  # noqa: E402
from data.common import download, make_out_dir, save_json  # noqa: E402

REPO, COMMIT = "da03/Internalize_CoT_Step_by_Step", "e06a32ee5e4cd117171daeb4755d2a97ece62761"
LFS_URL = f"https://media.githubusercontent.com/media/{REPO}/{COMMIT}/data/gsm8k"
RAW_URL = f"https://raw.githubusercontent.com/{REPO}/{COMMIT}/data/gsm8k"
SPLITS = {"train": 385620, "valid": 500, "test": 1319}  # lines in each file


def convert_lines(lines):
    """iCoT lines -> records, exactly as the official preprocessing does it:

    question = everything before the first "||", not stripped (whatever spaces end it stay);
    steps    = the text between the first and second "||", cut at its first "##", stripped, then split
               on single spaces (so a double space would give an empty step, as it does there);
    answer   = everything after the last "##", stripped (this is where each line's "\\n" goes).
    Lines are expected as file.readlines() gives them, each with its newline.
    """
    records = []
    for i, line in enumerate(lines):
        parts = line.split("||")
        if len(parts) < 2:
            raise ValueError(f"line {i + 1} has no '||' separating question and steps: {line[:60]!r}")
        records.append({"question": parts[0],
                        "steps": parts[1].split("##")[0].strip().split(" "),
                        "answer": line.split("##")[-1].strip()})
    return records


def read_lines(path):
    # text mode with universal newlines, then readlines(): the official script reads them the same way,
    # and str.splitlines() would not (it also splits on \x0b, \x1c, \u2028, ...)
    with open(path, encoding="utf-8") as f:
        return f.readlines()


def prepare(out_dir, lfs_url=LFS_URL, raw_url=RAW_URL):
    for split, expected in SPLITS.items():
        base = lfs_url if split == "train" else raw_url
        txt = os.path.join(out_dir, f"{split}.txt")
        download(f"{base.rstrip('/')}/{split}.txt", txt)
        try:
            records = convert_lines(read_lines(txt))
        except (ValueError, UnicodeDecodeError) as e:
            os.remove(txt)  # a bad file would otherwise be trusted by the next run
            raise RuntimeError(f"{txt}: {e}") from None
        path = os.path.join(out_dir, f"{split}.json")
        save_json(records, path)
        note = "" if len(records) == expected else f" (the official file has {expected})"
        print(f"{path}: {len(records)} records{note}")


def main(argv=None):
    p = Parser(prog="data/gsm8k/prepare.py", description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--lfs_url", default=os.environ.get("GSM8K_LFS_URL", LFS_URL),
                   help="where train.txt is (env GSM8K_LFS_URL)")
    p.add_argument("--raw_url", default=os.environ.get("GSM8K_RAW_URL", RAW_URL),
                   help="where valid.txt and test.txt are (env GSM8K_RAW_URL)")
    args = p.parse_args(argv)
    make_out_dir(p, args.out_dir)
    try:
        prepare(args.out_dir, args.lfs_url, args.raw_url)
    except RuntimeError as e:
        sys.exit(f"error: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
