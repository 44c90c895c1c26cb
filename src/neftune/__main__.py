"""``python -m neftune`` (also what ``accelerate launch -m neftune`` runs)."""

from neftune.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
