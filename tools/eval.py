"""Zero-shot evaluation from a checkout without installing: the same as `navit-clip eval`.

    python tools/eval.py --run runs/default --budgets 16,32,64
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from navit_clip.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
