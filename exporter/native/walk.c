/* Walks chains of length-prefixed records, which no array code can: where each record starts
 * depends on the length in the one before it. Built by scripts/install.sh; exporter/walk.py loads it
 * with ctypes and falls back to the same loops in Python when it is missing. */
#include <stdint.h>
#include <string.h>

static inline uint32_t load32(const uint8_t *at, int swapped) {
    uint32_t value;
    memcpy(&value, at, 4);
    return swapped ? __builtin_bswap32(value) : value;
}

/* Classic pcap records from byte `position` of buf[0:size): the offset of each record header into
 * `offsets`, at most `limit` of them, stopping before a record that does not end inside the buffer.
 * Returns how many; *next is where the walk stopped. A captured length above `max_captured` means a
 * corrupt file: the walk stops there and returns -1 - (records before it). */
long pcap_records(const uint8_t *buf, long size, long position, int swapped, long limit,
                  uint32_t max_captured, int64_t *offsets, long *next) {
    long count = 0;
    while (count < limit && position + 16 <= size) {
        uint32_t captured = load32(buf + position + 8, swapped);
        if (captured > max_captured) {
            *next = position;
            return -1 - count;
        }
        if (position + 16 + (long)captured > size)
            break;
        __builtin_prefetch(buf + position + 2048);  /* the walk is bound by memory latency */
        offsets[count++] = position;
        position += 16 + (long)captured;
    }
    *next = position;
    return count;
}

/* `count` records from `first`, each starting with the 32-bit (native order) distance to the next:
 * the frames of a TPACKET_V3 ring block. */
void chained_records(const uint8_t *buf, long first, long count, int64_t *offsets) {
    long position = first;
    for (long index = 0; index < count; index++) {
        offsets[index] = position;
        position += load32(buf + position, 0);
    }
}
