"""What every layer uses: the one-line errors and the entry-point wrapper (`errors`), atomic file writes (`atomic`),
a console that may be closed under us (`console`), and the signals that stop a command cleanly (`signals`)."""
