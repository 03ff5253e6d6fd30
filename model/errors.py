"""The model's configuration error, on its own so that config.py and the modules whose sections it
holds (moe/capacity.py) can both raise it without importing each other."""


class ConfigError(ValueError):
    """An invalid configuration value; the message names the dotted field."""


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)
