"""A stand-in for systemd's notification socket: prints each datagram (and its sender's pid) as a JSON line.

Usage: notify-listener.py SOCKET_PATH. Exits by itself after 120 s without a datagram.
"""
import json
import socket
import struct
import sys

s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
s.settimeout(120)
print(json.dumps({"bound": sys.argv[1]}), flush=True)
while True:
    try:
        msg, anc, _flags, _addr = s.recvmsg(4096, socket.CMSG_SPACE(12))
    except socket.timeout:
        break
    pid = None
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = struct.unpack("iII", data[:12])[0]
    print(json.dumps({"msg": msg.decode(errors="replace"), "pid": pid}), flush=True)
