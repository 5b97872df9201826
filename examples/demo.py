"""rimguard's main job on a real model, on a CPU: the README's command 1 (same as ``rimguard demo``).

The demo itself is :mod:`rimguard.demo.app`; ``python examples/demo.py --help`` lists its flags.
"""

from rimguard.demo.app import main

if __name__ == "__main__":
    main()
