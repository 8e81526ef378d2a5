"""
What the agent and its commands get of the night: an allowlisted environment with no API key,
cloud, Hugging Face or GitHub tokens or ssh agent; the key itself travels on a pipe instead. And
how the night runs the harness's own commands in the repository the agent writes.
"""

import os
import sys

from harness import settings

KEY_ENV = "ANTHROPIC_API_KEY"          # the key of the claude and api backends
OPENAI_KEY_ENV = "OPENAI_API_KEY"      # ... and of the codex backend
# internal: the API key arrives on this pipe, never through the environment
KEY_FD_FLAG = "--key-fd"
# What the agent's processes may see of the supervisor's environment (plus --pass-env): no cloud,
# Hugging Face or GitHub tokens, no ssh agent, unless the user names them.
ENV_ALLOW = {"PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "LANG", "LANGUAGE", "TZ", "TMPDIR",
             "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS",
             "IS_SANDBOX", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
             "no_proxy", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED",
             "GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL"}
# the cluster's client settings (SLURM_CONF, SBATCH_ACCOUNT) hold no secrets
ENV_ALLOW_PREFIXES = ("LC_", "XDG_", "AUTORESEARCH_", "CUDA_", "NVIDIA_", "UV_", "TORCH",
                      "TRITON_", "SLURM_", "SBATCH_")
CLIENT_ENV_PREFIXES = ("ANTHROPIC_", "CLAUDE_", "DISABLE_")  # the claude CLI's own (its key too)


def agent_environment(extra_names=(), client=False, night=None, agent=None) -> dict:
    """The environment of the agent and its commands: the allowlist, the names the user passed,
    the night's marker, the agent and model of its session (`agent`, recorded in the ledger's
    rows), and (for the claude CLI itself, `client`) its own ANTHROPIC_/CLAUDE_ settings."""
    def allowed(name):
        return (name in ENV_ALLOW or name in extra_names or name.startswith(ENV_ALLOW_PREFIXES)
                or (client and name.startswith(CLIENT_ENV_PREFIXES)))
    env = {k: v for k, v in os.environ.items() if allowed(k)}
    if night:
        env[settings.NIGHT_ENV] = night
    if agent:
        env[settings.AGENT_ENV] = agent
    return env


def key_pipe(key: str) -> int:
    """The read end of a pipe that holds the key (far smaller than a pipe's buffer), for a process
    started with it as --key-fd."""
    read_end, write_end = os.pipe()
    os.write(write_end, key.encode())
    os.close(write_end)
    return read_end


def key_from_file(path: str) -> str:
    """The key in `path` (its first line), which must be readable by this user only."""
    try:
        mode = os.stat(path).st_mode
        key = open(path).readline().strip()
    except OSError as e:
        raise ValueError(f"--key-file {path}: {e.strerror}") from None
    if mode & 0o077:
        raise ValueError(f"--key-file {path} is readable by other users (mode {mode & 0o777:o}): "
                         f"chmod 600 {path}")
    if not key:
        raise ValueError(f"--key-file {path} is empty: write the API key into it")
    return key


def key_env(backend: str) -> str:
    """The variable that holds the API key of a backend."""
    return OPENAI_KEY_ENV if backend == "codex" else KEY_ENV


def handed_over_key(key_fd, key_file, script: str, argv: list, name: str = KEY_ENV):
    """The API key (from `key_file`, else the environment's `name`), kept out of every
    environment: where the environment has one, the first call re-executes `script` (the
    supervisor) without it, the key on a pipe (so that it is not in /proc/<supervisor>/environ),
    and does not return; the re-executed one reads it from key_fd. None without a key; ValueError
    for a key file that cannot be used."""
    if key_fd is not None:
        with os.fdopen(key_fd) as f:
            return f.read() or None
    key = key_from_file(key_file) if key_file else os.environ.get(name)
    if not key or name not in os.environ:
        return key or None
    read_end = key_pipe(key)
    os.set_inheritable(read_end, True)
    env = {k: v for k, v in os.environ.items() if k != name}
    os.execve(sys.executable, [sys.executable, os.path.abspath(script), *argv, KEY_FD_FLAG,
                               str(read_end)], env)


def launcher_environment(args, environ):
    """Where `uv run launch.py` trains, for every process of the night: the launcher options as the
    AUTORESEARCH_ settings launch.py reads (an option not given leaves the environment's value)."""
    for value, name in ((args.launcher, settings.LAUNCHER_ENV),
                        (args.partition, settings.SLURM_PARTITION_ENV),
                        (args.gres, settings.SLURM_GRES_ENV),
                        (args.slurm_args, settings.SLURM_ARGS_ENV)):
        if value is not None:
            environ[name] = value


# How the night runs the harness's commands itself (settling, the report), outside the agent's box
# but in the repository the agent writes: with -P no module the agent leaves beside them (a json.py,
# a numpy.py) shadows one they import; the repository comes last on the path, for the harness's own
# packages (a folder, which Python prefers to a module of the same name).
HARNESS_RUNNER = ("import os, runpy, sys; sys.argv = sys.argv[1:]; sys.path.append(os.getcwd()); "
                  "runpy.run_path(sys.argv[0], run_name='__main__')")


def harness_command(script: str, *args) -> list:
    return [sys.executable, "-P", "-c", HARNESS_RUNNER, script, *args]


def harness_environment(extra_names=(), night=None, agent=None) -> dict:
    """The environment of the harness's commands the night runs itself (for the agent, or to
    settle and report): the agent's, without the runner's socket, so they run here."""
    env = agent_environment(extra_names, night=night, agent=agent)
    env.pop(settings.RUN_SOCKET_ENV, None)
    return env
