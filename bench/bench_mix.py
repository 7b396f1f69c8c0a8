"""Peak memory of the TR-DPO reference mix against the model size: streaming vs loading both models.

Builds a random Llama checkpoint (reference, fp32, one file) and a perturbed copy (policy, sharded) locally,
then runs each mix in a fresh subprocess and reads its peak RSS above the level before the mix (VmHWM after a
reset, see ``pipeline.train.mix.PeakRss``):

* ``streaming``: :func:`pipeline.train.mix.mix_safetensors`, chunk by chunk;
* ``in-memory``: ``safetensors.torch.load_file`` both models, mix the tensors, ``save_file`` the result (what
  any mix that holds the two state dicts costs).

    .venv/bin/python bench/bench_mix.py --layers 6 --hidden 1024 --vocab 16000 --work /tmp/bench-mix

Prints one Markdown table row per mode (the figures in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_IN_MEMORY = """
import json, sys, time, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
from pipeline.train.mix import PeakRss
ref_dir, pol_dir, out_dir, alpha = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
start = time.perf_counter()
with PeakRss() as peak:
    reference = load_file(ref_dir / "model.safetensors")
    policy = {}
    for shard in sorted(pol_dir.glob("*.safetensors")):
        policy.update(load_file(shard))
    for name, tensor in reference.items():
        tensor.mul_(1 - alpha).add_(policy[name], alpha=alpha)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(reference, out_dir / "model.safetensors", metadata={"format": "pt"})
print(json.dumps({"peak_rss_delta_bytes": peak.delta, "seconds": round(time.perf_counter() - start, 3)}))
"""

_STREAMING = """
import json, sys
from pathlib import Path
from pipeline.train.mix import mix_safetensors
print(json.dumps(mix_safetensors(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4]))))
"""


def build_models(work: Path, *, layers: int, hidden: int, vocab: int) -> tuple[Path, Path]:
    """A random fp32 Llama (the reference) and the same plus noise saved in 100 MB shards (the policy)."""
    import torch
    from llama import random_llama

    model = random_llama(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=8,
    )
    model.save_pretrained(work / "reference")
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param), alpha=1e-3)
    model.save_pretrained(work / "policy", max_shard_size="100MB")
    return work / "reference", work / "policy"


def measure(script: str, reference: Path, policy: Path, out: Path, alpha: float) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", script, str(reference), str(policy), str(out), str(alpha)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--alpha", type=float, default=0.6)
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-mix-"))
    reference, policy = build_models(work, layers=args.layers, hidden=args.hidden, vocab=args.vocab)
    model_bytes = (reference / "model.safetensors").stat().st_size
    print("| mix | model (MiB) | peak RSS above start (MiB) | peak / model | seconds |")
    print("|---|---:|---:|---:|---:|")
    modes = (("streaming (`mix_safetensors`)", _STREAMING), ("in-memory (load both, mix, save)", _IN_MEMORY))
    for mode, script in modes:
        stats = measure(script, reference, policy, work / f"out-{mode.split()[0]}", args.alpha)
        peak = stats["peak_rss_delta_bytes"]
        print(
            f"| {mode} | {model_bytes / 2**20:.0f} | {peak / 2**20:.0f} | {peak / model_bytes:.2f} | "
            f"{stats['seconds']:.1f} |"
        )


if __name__ == "__main__":
    main()
