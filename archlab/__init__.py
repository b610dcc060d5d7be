"""archlab: compose transformer students from plugins, distil, sweep, compare density."""

__version__ = "0.1.0"
