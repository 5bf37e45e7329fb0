"""Run ``fastvit train`` and SIGKILL this process when step N begins (tests of exact resume).

    python kill_at_step.py N [train arguments]          (also as a torchrun script)

Step N begins once steps 1..N are done and step N's state (if due) is saved; the kill
leaves no chance for cleanup, as a crash or an out-of-memory kill would not.
"""

import os
import signal
import sys

from vit.tools.train import main, schedule

KILL_AT = int(sys.argv[1])
apply_rate = schedule.WarmupCosine.apply


def apply_or_die(self, optimizer, step: int) -> float:
    if step == KILL_AT:  # the loop sets the learning rate first in every step
        os.kill(os.getpid(), signal.SIGKILL)
    return apply_rate(self, optimizer, step)


schedule.WarmupCosine.apply = apply_or_die
sys.exit(main(sys.argv[2:]))
