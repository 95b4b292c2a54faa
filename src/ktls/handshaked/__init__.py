"""``ktls handshaked``: handshakes in one small daemon that alone can read the private
keys; finished connections are handed to worker processes over a Unix socket.

:mod:`.codec` is the message format (sans-IO), :mod:`.daemon` the daemon,
:mod:`.worker` the workers' API.
"""
