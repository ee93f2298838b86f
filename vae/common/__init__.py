"""What every layer uses: the one-line errors and the entry-point wrapper (`errors`), atomic file writes (`atomic`),
and a console that may be closed under us (`console`)."""
