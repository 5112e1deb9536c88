"""Entry script for pylora.bench.merge_checkpoint, the suite that ships with the package (python -m pylora.bench.merge_checkpoint
and `pylora bench` run the same code; --help lists its options). From here it imports this checkout's
pylora and writes its JSON to bench/results/ unless --out says otherwise."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pylora.bench.merge_checkpoint import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(out_dir=os.path.join(ROOT, "bench", "results")))
