"""Everything the Debian installer reads: netboot selection, lock file, preseed, initrd and ISO."""
