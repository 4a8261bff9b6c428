"""Run a command on a pseudo-terminal of a real size and record everything it writes, escape codes
included: what a person at a terminal sees, for checking progress bars (`make demo`).

    .venv/bin/python benchmarks/record_terminal.py tty.log make demo

`script -qc` is no substitute here: without a terminal of its own it opens a 0x0 one.
"""

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

ROWS, COLUMNS = 40, 120


def main(log_path: str, command: list[str]) -> int:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    process = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    with open(log_path, "wb") as log:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # the command and its children closed the terminal
                break
            if not data:
                break
            log.write(data)
            log.flush()
    return process.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
