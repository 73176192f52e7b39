"""Entry point of the frozen executable: exactly `tandem` / `python -m app`."""

from app.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
