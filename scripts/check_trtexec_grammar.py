"""Check tests/data/trtexec/<version>.txt against trtexec's own option parser.

For each grammar file, reads samples/common/sampleOptions.cpp of the matching release branch of
an NVIDIA/TensorRT git checkout and reports options the file lists that the parser never reads,
and options vitedge cares about that the parser reads but the file leaves out.

    git clone --bare https://github.com/NVIDIA/TensorRT trt.git
    python scripts/check_trtexec_grammar.py trt.git
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GRAMMARS = REPO / "tests" / "data" / "trtexec"
# Options whose absence from a grammar file is a claim (trtexec of that version lacks them).
WATCHED = ("fp16", "int8", "best", "stronglyTyped", "builderOptimizationLevel", "versionCompatible", "vc",
           "memPoolSize", "useDLACore", "allowGPUFallback")


def parser_options(checkout: str, branch: str) -> set[str]:
    """Every ``"--name"`` the release's sampleOptions.cpp passes to a getAndDel* / getShapes* reader.

    SafeBuilderOptions::parse belongs to the safety builder sample, not to trtexec: left out.
    """
    source = subprocess.run(["git", "-C", checkout, "show", f"{branch}:samples/common/sampleOptions.cpp"],
                            check=True, capture_output=True, text=True).stdout
    source = re.sub(r"void SafeBuilderOptions::parse\(.*?\n}\n", "", source, flags=re.S)
    return set(re.findall(r'(?:getAndDel\w*|getShapes\w*|getLayer\w*|getStringsSet)\(\s*arguments,\s*[\w, ]*?"--(\w+)"',
                          source))


def listed_options(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#") and line.split()[0] not in ("excludes", "deprecated"):
            names.add(line.split()[0])
    return names


def main(checkout: str) -> int:
    problems = 0
    for path in sorted(GRAMMARS.glob("*.txt")):
        branch = f"release/{path.stem}"
        known, listed = parser_options(checkout, branch), listed_options(path)
        for name in sorted(listed - known):
            print(f"{path.name}: --{name} is listed but {branch}'s parser does not read it")
            problems += 1
        for name in sorted(set(WATCHED) & known - listed):
            print(f"{path.name}: --{name} is read by {branch}'s parser but not listed")
            problems += 1
    print("grammar files agree with the parsers" if problems == 0 else f"{problems} disagreements")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
