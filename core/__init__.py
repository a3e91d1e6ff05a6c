"""Engine core: typed config, Spark session factory and the storage layer every stage sits on."""
from importlib.resources import files

__version__ = files("core").joinpath("VERSION").read_text().strip()
