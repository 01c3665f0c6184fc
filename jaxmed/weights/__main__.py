"""python -m jaxmed.weights convert IN.pth OUT.safetensors

Converts a PyTorch state dict (e.g. torchvision's vgg16-397923af.pth, resnet18-f37072fd.pth,
resnet50-11ad3fa6.pth) into a safetensors file that `--pretrained` reads without torch.
"""

from __future__ import annotations

import argparse
import sys

from jaxmed.errors import InputDataError
from jaxmed.weights._convert import convert


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jaxmed.weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("convert", help="a .pth state dict -> a .safetensors file "
                            "(needs torch; loads with weights_only=True)")
    c.add_argument("source", metavar="IN.pth")
    c.add_argument("target", metavar="OUT.safetensors")
    args = parser.parse_args(argv)
    try:
        count = convert(args.source, args.target)
    except (InputDataError, RuntimeError) as error:
        sys.exit(f"error: {error}")
    print(f"{args.target}: {count} arrays")


if __name__ == "__main__":
    main()
