/* Byte-order helpers for the 24-byte hintens frame header (the CRC16 kernel is _crc16.h).
 *
 * Every load and store goes through memcpy so it is safe on unaligned data (frames sit at any
 * offset of a receive buffer); compilers turn each into a single mov plus bswap.
 * The header is big-endian: see docs/PROTOCOL.md.
 */
#ifndef HINTENS_WIRE_H
#define HINTENS_WIRE_H

#include <stdint.h>
#include <string.h>

#define HX_HEADER_SIZE 24

#if defined(__GNUC__) || defined(__clang__)
#  define HX_BSWAP16(x) __builtin_bswap16(x)
#  define HX_BSWAP32(x) __builtin_bswap32(x)
#  define HX_BSWAP64(x) __builtin_bswap64(x)
#else
#  error "hintens needs GCC or Clang builtins"
#endif

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#  define HX_BE16(x) (x)
#  define HX_BE32(x) (x)
#  define HX_BE64(x) (x)
#else
#  define HX_BE16(x) HX_BSWAP16(x)
#  define HX_BE32(x) HX_BSWAP32(x)
#  define HX_BE64(x) HX_BSWAP64(x)
#endif

static inline uint16_t hx_load_be16(const unsigned char *p) {
    uint16_t v; memcpy(&v, p, 2); return (uint16_t)HX_BE16(v);
}
static inline uint32_t hx_load_be32(const unsigned char *p) {
    uint32_t v; memcpy(&v, p, 4); return (uint32_t)HX_BE32(v);
}
static inline uint64_t hx_load_be64(const unsigned char *p) {
    uint64_t v; memcpy(&v, p, 8); return (uint64_t)HX_BE64(v);
}
static inline void hx_store_be16(unsigned char *p, uint16_t v) {
    v = (uint16_t)HX_BE16(v); memcpy(p, &v, 2);
}
static inline void hx_store_be32(unsigned char *p, uint32_t v) {
    v = (uint32_t)HX_BE32(v); memcpy(p, &v, 4);
}
static inline void hx_store_be64(unsigned char *p, uint64_t v) {
    v = (uint64_t)HX_BE64(v); memcpy(p, &v, 8);
}

/* The header fields, host order. */
typedef struct {
    uint16_t magic;
    uint16_t version;
    uint32_t type;
    uint16_t flags;
    uint32_t length;
    uint16_t checksum;
    uint64_t request_id;
} hx_header;

static inline void hx_pack_header(unsigned char *p, const hx_header *h) {
    hx_store_be16(p + 0, h->magic);
    hx_store_be16(p + 2, h->version);
    hx_store_be32(p + 4, h->type);
    hx_store_be16(p + 8, h->flags);
    hx_store_be32(p + 10, h->length);
    hx_store_be16(p + 14, h->checksum);
    hx_store_be64(p + 16, h->request_id);
}

static inline void hx_unpack_header(const unsigned char *p, hx_header *h) {
    h->magic = hx_load_be16(p + 0);
    h->version = hx_load_be16(p + 2);
    h->type = hx_load_be32(p + 4);
    h->flags = hx_load_be16(p + 8);
    h->length = hx_load_be32(p + 10);
    h->checksum = hx_load_be16(p + 14);
    h->request_id = hx_load_be64(p + 16);
}

#endif /* HINTENS_WIRE_H */
