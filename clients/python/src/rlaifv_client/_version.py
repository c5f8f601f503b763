__title__ = "rlaifv-client"
__version__ = "0.1.0"
