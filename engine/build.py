"""python -m engine.build model.pt: the build command's entry point; the build side itself is engine/builder/."""

from engine.builder.cli import main
from engine.common.errors import run_cli

__all__ = ["main"]

if __name__ == "__main__":
    run_cli(main)
