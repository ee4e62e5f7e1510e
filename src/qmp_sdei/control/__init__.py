"""The control API: orchestrators and operators raise events and read state.

One command layer (:mod:`.commands`), two transports: the always-on local unix socket
(:mod:`.local`) and, when configured, MQTT v5 (:mod:`.mqtt`). JSON Schemas of requests, replies and
notifications ship in ``schemas/``.
"""
