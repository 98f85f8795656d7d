"""End-to-end benchmark: EAGLE vs vanilla decoding and Hugging Face generate / prompt lookup /
assisted generation, on one checkpoint and prompt set (the implementation is ``eagle.bench``).

    python bench/e2e.py                                   # bundled tiny-code pair, every method
    python bench/e2e.py --batch 1 4 --temperature 0 1 --num-prompts 4 --new-tokens 64 --threads 1
    python bench/e2e.py --quick                           # smoke test
    python bench/e2e.py --help                            # every option

Same as ``eagle bench``. Writes bench/results/e2e_<target>[_randomdraft][_quick].json and .png.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eagle.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
