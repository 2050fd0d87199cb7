"""
One line for a mistyped command: every script's parser (train.py through options.py, sample.py, bench.py,
gpu_check.py, the data sets' prepare.py) is an argparse parser whose errors leave out the usage (often 25 lines of
it) and name what was probably meant: the closest flag, or the closest of the valid choices. --help stays whole.
"""
import argparse
import difflib
import re


class Parser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose error() prints `<prog>: error: <one line>` and exits 2, as argparse does."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message, self.flags())}\n")

    def flags(self):
        """Every long option string this parser knows (--help's hidden ones too, but not the suppressed)."""
        return sorted(s for a in self._actions if a.help != argparse.SUPPRESS
                      for s in a.option_strings if s.startswith("--"))


def one_line(message, flags):
    """argparse's error message -> one line that names the likeliest intended flag or choice.
    message: what argparse passes to error() (e.g. "unrecognized arguments: --datset mine")."""
    unknown = re.fullmatch(r"unrecognized arguments: (.*)", message, re.S)
    if unknown:
        return unrecognized(unknown.group(1).split(), flags)
    choice = re.fullmatch(r"argument (\S+): invalid choice: '?([^']*?)'? \(choose from (.*)\)", message, re.S)
    if choice:
        flag, value, valid = choice.groups()
        names = [v.strip().strip("'") for v in valid.split(",")]
        close = difflib.get_close_matches(value, names, n=1)
        guess = f"; did you mean {close[0]}?" if close else ""
        return f"argument {flag}: invalid choice {value!r}{guess} (choose from {', '.join(names)})"
    return " ".join(message.split())


def unrecognized(words, flags):
    """The words argparse did not take: each mistyped flag with its closest flag; a stray value said as such."""
    typed = [w for w in words if w.startswith("-")]
    if not typed:
        return (f"unrecognized argument{'s' if len(words) > 1 else ''} {' '.join(words)}: a value must follow "
                f"its flag (--help lists them)")
    guesses = [difflib.get_close_matches(w.split("=", 1)[0], flags, n=1) for w in typed]
    if len(typed) == 1:
        flag = typed[0].split("=", 1)[0]
        return f"unrecognized argument {flag}; " + (f"did you mean {guesses[0][0]}?" if guesses[0] else
                                                   "--help lists the flags")
    return "unrecognized arguments " + ", ".join(
        w.split("=", 1)[0] + (f" (did you mean {g[0]}?)" if g else "") for w, g in zip(typed, guesses))
