"""``fastvit train``: mixed-precision ViT training, one process or many under torchrun.

    fastvit train --steps 600                             # digits, small ViT, CPU
    torchrun --nproc_per_node=8 -m vit.tools.train --data /imagenet --model vit_base_patch16_224 \\
        --amp bf16 --fsdp --batch-size 1024 --out runs/b16
    fastvit train --resume runs/b16                       # continue exactly where it stopped
    fastvit train --init hf-snapshot-dir --data /images --layer-decay 0.65   # fine-tune

``--batch-size`` is the global batch: each of N ranks takes a contiguous 1/N slice of the same
seeded batch. Files: args (command line), dist (torchrun, DDP/FSDP2), batches (data), schedule,
state (resume), metrics (records, evaluation, summary), pretrained (--init), finetune (layer
decay, head lr scale, linear probe, drop path), trainer (the loop), command (main).
"""

from .command import main
from .errors import TrainError

__all__ = ["TrainError", "main"]
