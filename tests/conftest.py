import os
import sys

# Tests import shared references (e.g. `ellipses`) from this folder.
sys.path.insert(0, os.path.dirname(__file__))
