"""``fastvit``: the command line.

  fastvit bench      parity-checked speed of every provider (the README's main job)
  fastvit predict    top-5 classes for image files with a pretrained checkpoint
  fastvit train      training (vit.tools.train; every argument after ``train`` is its own)
  fastvit embed      embeddings of every image of a folder into one file (resumable, torchrun)
  fastvit search     the nearest images of such a file to query images (cosine similarity)
"""

from __future__ import annotations

import argparse
import sys


def _bench_parser(sub) -> None:
    from vit.config import PRESETS

    from .bench.settings import CPU_BATCH, CPU_MODEL, CUDA_BATCH, CUDA_MODEL, DTYPES

    p = sub.add_parser(
        "bench", help="parity-check, then time every provider (eager, compile, hf, fast-*)",
        description="Check every provider's logits against the fp32 reference on the same weights, "
                    "then time inference (and with --train a training step) of those that pass. "
                    "Prints a table and writes results.json (+ results.png with matplotlib) to --out.")
    p.add_argument("--model", choices=list(PRESETS), metavar="PRESET",
                   help=f"model preset (default: {CPU_MODEL} on CPU, {CUDA_MODEL} on CUDA); "
                        f"one of: {', '.join(PRESETS)}")
    p.add_argument("--batch-size", type=int, help=f"images per step (default {CPU_BATCH} on CPU, "
                                                   f"{CUDA_BATCH} on CUDA)")
    p.add_argument("--dtype", choices=list(DTYPES),
                   help="fp32, or bf16/fp16 under torch.autocast (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--providers", help="comma-separated providers, or 'all' (default: every default "
                                       "provider that can run here; see --list-providers). "
                                       "eager, the baseline, is always measured")
    p.add_argument("--img-size", type=int, help="image side in pixels (default: the preset's)")
    p.add_argument("--steps", type=int, help="interleaved rounds, each timing one step of every "
                                             "provider in turn (default: about 20 s (CPU) / 15 s (CUDA) of rounds, "
                                             "at least 5)")
    p.add_argument("--warmup", type=int, help="untimed warm-up steps (default: 5 on CUDA; "
                                              "on CPU 1, or 2 with --train)")
    p.add_argument("--train", action="store_true",
                   help="also time a training step (forward, cross-entropy, backward, AdamW) "
                        "and check gradients")
    p.add_argument("--out", default="bench-out", help="folder for results.json / results.png "
                                                      "(default: ./bench-out)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and images (default 0)")
    p.add_argument("--list-providers", action="store_true",
                   help="list the providers and whether they can run here, then exit")
    p.set_defaults(func=_bench)


def _bench(args, stdout, stderr) -> int:
    from .bench import main

    return main(args, stdout, stderr)


def _predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="top-5 classes for image files",
                       description="Classify image files with a pretrained ViT; preprocessing and "
                                   "class names come from the checkpoint.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (anything PIL reads)")
    p.add_argument("--pretrained", required=True, metavar="PATH",
                   help="HF snapshot directory (config.json + weights) or a safetensors file "
                        "saved by vit.weights.save with its config")
    p.add_argument("--model", metavar="PRESET",
                   help="preset for a weights file that carries no config (timm/HF/ours)")
    p.add_argument("--fast", action="store_true", help="run the fast model (vit.fast.ViT)")
    p.add_argument("--topk", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    _keep_aspect_options(p)
    p.set_defaults(func=_predict)


def _keep_aspect_options(p) -> None:
    p.add_argument("--keep-aspect", action="store_true",
                   help="keep each image's aspect ratio: resize it to at most --max-patches patches "
                        "(no crop) and run each batch as one packed list of sizes (no padding)")
    p.add_argument("--max-patches", type=int, metavar="N",
                   help="with --keep-aspect: patches per image at most (default: the model's own grid, "
                        "e.g. 196 for 224 px and patch 16)")


def _check_keep_aspect(args, stderr) -> bool:
    if args.max_patches is not None and not args.keep_aspect:
        print("error: --max-patches needs --keep-aspect", file=stderr)
        return False
    if args.max_patches is not None and args.max_patches <= 0:
        print(f"error: --max-patches must be a positive integer, got {args.max_patches}", file=stderr)
        return False
    return True


def _predict(args, stdout, stderr) -> int:
    from . import predict

    if not _check_keep_aspect(args, stderr):
        return 2
    for name in ("topk", "batch_size"):
        if getattr(args, name) <= 0:
            print(f"error: --{name.replace('_', '-')} must be a positive integer, "
                  f"got {getattr(args, name)}", file=stderr)
            return 2
    return predict.main(args, stdout, stderr)


def _positive(parser_name: str, args, stderr, *names: str, zero_ok: tuple[str, ...] = ()) -> bool:
    """Print an error and return False unless each of ``names`` is a positive integer (or 0 if in zero_ok)."""
    for name in names:
        value, least = getattr(args, name), 0 if name in zero_ok else 1
        if value < least:
            kind = "a non-negative" if least == 0 else "a positive"
            print(f"error: {parser_name} --{name.replace('_', '-')} must be {kind} integer, got {value}", file=stderr)
            return False
    return True


def _embed_parser(sub) -> None:
    import os

    from .progress import MODES

    p = sub.add_parser("embed", help="embeddings of every image of a folder, into one safetensors file",
                       description="Run every image under IMAGES_DIR (recursively) through a ViT and write the "
                                   "pooled embeddings (forward_head(..., pre_logits=True)) with the relative "
                                   "paths to one safetensors file. Rerunning skips what the file already holds; "
                                   "under torchrun each rank embeds a shard and rank 0 merges.")
    p.add_argument("images", metavar="IMAGES_DIR", help="folder of images (searched recursively)")
    p.add_argument("--pretrained", required=True, metavar="PATH",
                   help="HF snapshot directory or a safetensors file (as for fastvit predict)")
    p.add_argument("--model", metavar="PRESET", help="preset for a weights file that carries no config")
    p.add_argument("--out", default="embeddings.safetensors",
                   help="output file (default ./embeddings.safetensors); chunks go to OUT.parts/ meanwhile")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="dtype of the stored embeddings (default float32)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader worker processes decoding images (default min(4, CPUs); 0: in process)")
    p.add_argument("--chunk-size", type=int, default=4096,
                   help="rows per chunk file: a kill loses at most this many (default 4096)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default="auto",
                   help="autocast dtype (default auto: bf16 on CUDA, none on CPU)")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                   help="the fast model vit.fast.ViT (default) or the reference (--no-fast)")
    p.add_argument("--progress", choices=MODES, default="auto",
                   help="progress display (auto: a bar on a terminal, a final line otherwise)")
    _keep_aspect_options(p)
    p.set_defaults(func=_embed)


def _embed(args, stdout, stderr) -> int:
    from . import embed

    if not _positive("embed", args, stderr, "batch_size", "chunk_size", "workers", zero_ok=("workers",)):
        return 2
    if not _check_keep_aspect(args, stderr):
        return 2
    return embed.main_embed(args, stdout, stderr)


def _search_parser(sub) -> None:
    p = sub.add_parser("search", help="nearest images of a `fastvit embed` file to query images",
                       description="Embed each query image with the model that wrote the index and print its "
                                   "k nearest indexed images by cosine similarity, best first.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="query image files")
    p.add_argument("--index", required=True, metavar="FILE", help="embeddings file written by fastvit embed")
    p.add_argument("--k", type=int, default=5, help="neighbours per query (default 5)")
    p.add_argument("--pretrained", metavar="PATH",
                   help="the index's checkpoint, if it has moved (default: the path stored in the index)")
    p.add_argument("--model", metavar="PRESET", help="preset (default: the one stored in the index)")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                   help="the fast model (default) or the reference (--no-fast)")
    p.add_argument("--batch-size", type=int, default=16, help="query images per forward pass (default 16)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.set_defaults(func=_search)


def _search(args, stdout, stderr) -> int:
    from . import embed

    if not _positive("search", args, stderr, "k", "batch_size"):
        return 2
    return embed.main_search(args, stdout, stderr)


def _train(argv: list[str], stderr) -> int:
    import importlib

    train = importlib.import_module("vit.tools.train")
    return int(train.main(argv) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastvit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{bench,predict,train,embed,search}")
    _bench_parser(sub)
    _predict_parser(sub)
    _embed_parser(sub)
    _search_parser(sub)
    # listed for --help only: main() hands everything after "train" to vit.tools.train untouched
    sub.add_parser("train", help="train a ViT (arguments: see `fastvit train --help`)", add_help=False)
    return parser


def main(argv: list[str] | None = None, *, stdout=None, stderr=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    if argv and argv[0] == "train":
        return _train(argv[1:], stderr)
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded with the results
    return args.func(args, stdout, stderr)


if __name__ == "__main__":
    sys.exit(main())
