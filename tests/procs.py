"""Finding the processes a proxy started, for the tests and the benchmarks (no pytest needed).

The harness puts a unique value in an environment variable of the proxy; every process the proxy
starts (the CLI, anything the CLI starts) inherits it, so a scan of /proc finds them all (Linux).
"""

import os


def tagged_processes(variable, value, exclude=()):
    """PIDs of processes whose environment has variable=value, except those in `exclude`."""
    needle = ("%s=%s" % (variable, value)).encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in exclude:
            continue
        try:
            with open("/proc/%s/environ" % name, "rb") as handle:
                if needle in handle.read():
                    found.append(int(name))
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return found
