"""What SIGHUP changes in a running process: users, TLS certificates, the log level, the API's allowed origins
and hosts (docs/operations.md).

`reload` reads the configuration file again and applies what can change
while connections stay open; anything else that differs is logged as
needing a restart. A file that does not load changes nothing.
"""

import logging

from cluster import config as config_module, logs, tls

log = logging.getLogger("meshgate.supervisor")


def _keep_closed(running, new) -> None:
    """An API that listens beyond loopback keeps its users: the binds in force are the running ones.

    Raises:
        ConfigError: the new file has no users while a running API bind is not a loopback address.
    """
    if new.access.users:
        return
    for key, bind in (("node.api.bind", running.node.api.bind), ("coordinator.api.bind", running.coordinator.api.bind)):
        if not config_module.is_loopback(bind):
            raise config_module.ConfigError(f"access.users: required while {key} is {bind} (a restart changes binds)")


def reload(running, access, contexts):
    """Applies the configuration file of `running` again.

    Args:
        running: the Config the process started with (what a restart would change is compared to it).
        access: the process's cluster.access.Access.
        contexts: `(ssl.SSLContext, TlsConfig, where)` of the process's TLS listeners.

    Returns:
        The new Config, or None when it could not be read (the old one stays in force).
    """
    if running.path is None:
        log.info("SIGHUP: no configuration file to read again (built-in defaults)")
        return None
    try:
        new = config_module.load(running.path)
        _keep_closed(running, new)
        for context, settings, where in contexts:
            tls.reload(context, settings, running, where)
    except (config_module.ConfigError, tls.TlsError) as exc:
        log.error("SIGHUP: configuration not reloaded, the running one stays: %s", exc)
        return None
    access.load(new)
    logs.set_level(new.logging.level)
    later = config_module.needs_restart(running, new)
    if later:
        log.warning("SIGHUP: changes to %s take effect after a restart", ", ".join(later))
    log.info("SIGHUP: reloaded %s (%d users, %d TLS certificates)", running.path, len(new.access.users),
             len(contexts))
    return new
