"""
Stopping train.py cleanly: Ctrl-C or SIGTERM lets the optimizer step finish, train.py saves and stops; a
second Ctrl-C stops at once, unless it comes within REPEAT_SECONDS of the first (a terminal's Ctrl-C reaches every
process and torchrun, which passes it on: two signals at once) or during a save, which no signal cuts short.
Under torchrun the processes agree on stopping (train_step reduces the flag over them) and wait for rank 0's
save before any exits. The tests stop a run at an exact step through SIGNAL_HOOK, and make its saves
slow through SAVE_DELAY_HOOK.
"""
import contextlib
import os
import signal
import sys
import time

SIGNAL_HOOK = "TRAIN_TEST_SIGNALS"  # tests: "5:KILL,9:INT" sends this process SIGKILL after step 5, SIGINT after 9;
#                                     "5:TERM@parent" (rank 0) SIGTERM to its parent (torchrun) after step 5,
#                                     "5:INT@group" (rank 0) SIGINT to its whole process group
SAVE_DELAY_HOOK = "TRAIN_TEST_SAVE_DELAY"  # tests: seconds that rank 0 waits before it writes a checkpoint
STOP = {"requested": False, "saving": False, "at": 0.0}  # set by the handler, read between steps
REPEAT_SECONDS = 5  # a second signal sooner than this after the first is the same stop, not a stop at once


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: the state is saved, the run stops."""


def install_signal_handlers():
    def handler(signum, frame):
        name = signal.Signals(signum).name
        if STOP["saving"]:  # never cut a save short (torchrun signals again when a process exits before another)
            STOP["requested"] = True
            print(f"\n{name}: a checkpoint is being written; the run stops after it", file=sys.stderr, flush=True)
            return
        if STOP["requested"] and time.time() - STOP["at"] < REPEAT_SECONDS:
            return  # the same stop again: a terminal's Ctrl-C reaches torchrun too, which passes it on
        if STOP["requested"]:
            raise KeyboardInterrupt
        STOP.update(requested=True, at=time.time())
        print(f"\n{name}: saving at the end of this step (again to stop at once)", file=sys.stderr, flush=True)
    STOP.update(requested=False, saving=False, at=0.0)
    try:
        return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread (e.g. called from a notebook worker): no handlers
        return {}


def restore_signal_handlers(previous):
    for s, h in previous.items():
        signal.signal(s, h)


@contextlib.contextmanager
def saving():
    """A save under way: a signal now asks the run to stop (as the first one does), never at once."""
    STOP["saving"] = True
    try:
        yield
    finally:
        STOP["saving"] = False


def send_test_signal(step):
    """The tests' way to kill a run at an exact step: TRAIN_TEST_SIGNALS="5:KILL,9:INT,12:TERM@parent"."""
    for item in filter(None, os.environ.get(SIGNAL_HOOK, "").split(",")):
        at, name = item.split(":")
        name, _, whom = name.partition("@")
        if int(at) != step or (whom and os.environ.get("RANK", "0") != "0"):  # the parent or group: from rank 0
            continue
        sig = getattr(signal, "SIG" + name)
        if whom == "group":  # every process of the launch, torchrun too: what a terminal's Ctrl-C does
            os.killpg(os.getpgid(0), sig)
        else:
            os.kill(os.getppid() if whom == "parent" else os.getpid(), sig)


def slow_save_for_tests():
    """The tests' slow save (TRAIN_TEST_SAVE_DELAY seconds), to show that no process exits while rank 0 writes."""
    time.sleep(float(os.environ.get(SAVE_DELAY_HOOK) or 0))
