import sys

from navit_clip.cli import main

sys.exit(main())
