"""What every data set shares: where downloads go and the error a data problem raises.

Its own module so that the image data (:mod:`cbp.zoo.data`) and the text data (:mod:`cbp.zoo.text`) both
build on it without importing each other.
"""

from __future__ import annotations

import os

DOWNLOAD_DIR = os.path.join(os.path.expanduser("~"), ".cache", "cbp")


class DataError(ValueError):
    """Missing or malformed data; the message is one line meant for the user."""
