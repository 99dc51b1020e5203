"""python -m engine.demo: the whole product on the built-in demo data (the app is train/demo.py: it trains)."""

from engine.common.errors import run_cli
from train.demo import main

if __name__ == "__main__":
    run_cli(main)
