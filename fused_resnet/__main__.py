"""`python -m fused_resnet bench|check|train ...`"""
from .tools.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
