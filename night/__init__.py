"""
The overnight loop: one agent's night (supervisor), several workers (workers), the stop rules
(rules), the watch over the fixed files (watch), the agent's environment and key (environment),
and one module per agent backend (claude, api). supervise.py is its command line.
"""
