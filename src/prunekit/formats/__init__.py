"""On-disk formats: what every saved folder shares (checksums), one file per format as they move here."""
