"""What of a mapped file is resident in this process (Linux's /proc/self/smaps)."""


def resident_kb_of_mapping(path) -> int:
    """Resident kB of this process's mappings of the file `path`."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        if "-" in line.split(" ", 1)[0]:                  # a mapping's header line
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total
