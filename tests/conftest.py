import os
import sys

# the modules under test live at the repository root, next to this folder
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
