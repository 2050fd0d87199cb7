"""
Stopping train.py cleanly: Ctrl-C or SIGTERM lets the optimizer step finish, train.py saves and stops; a
second Ctrl-C stops at once. The tests stop a run at an exact step through SIGNAL_HOOK.
"""
import os
import signal
import sys

SIGNAL_HOOK = "TRAIN_TEST_SIGNALS"  # tests: "5:KILL,9:INT" sends this process SIGKILL after step 5, SIGINT after 9
STOP = {"requested": False}  # set by the Ctrl-C / SIGTERM handler, read between steps


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: the state is saved, the run stops."""


def install_signal_handlers():
    def handler(signum, frame):
        if STOP["requested"]:
            raise KeyboardInterrupt
        STOP["requested"] = True
        print(f"\n{signal.Signals(signum).name}: saving at the end of this step (again to stop at once)",
              file=sys.stderr, flush=True)
    STOP["requested"] = False
    try:
        return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread (e.g. called from a notebook worker): no handlers
        return {}


def restore_signal_handlers(previous):
    for s, h in previous.items():
        signal.signal(s, h)


def send_test_signal(step):
    """The tests' way to kill a run at an exact step: TRAIN_TEST_SIGNALS="5:KILL,9:INT"."""
    for item in filter(None, os.environ.get(SIGNAL_HOOK, "").split(",")):
        at, name = item.split(":")
        if int(at) == step:
            os.kill(os.getpid(), getattr(signal, "SIG" + name))
