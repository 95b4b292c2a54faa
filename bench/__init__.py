"""ktls benchmarks: one tool, many suites.

``python -m bench`` (``make bench``) runs the registered suites (see
:mod:`bench.registry`) on this machine and inside a UML test kernel, prints one table
and writes one JSON file.  A suite is a module under ``bench/`` that declares *paths*
(things measured, each giving one number per run) and *rows* (a path compared with a
baseline path measured in the same run).  New benchmarks add a suite module, or paths
and rows to an existing one; the runner, statistics, table and JSON are shared.
"""
