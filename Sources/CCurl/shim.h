// libcurl for Swift: Swift cannot call the variadic curl_easy_setopt / curl_easy_getinfo /
// curl_multi_setopt, so each argument type gets a small typed wrapper here.
#ifndef CLEARHOUSE_CCURL_SHIM_H
#define CLEARHOUSE_CCURL_SHIM_H

#include <curl/curl.h>
#include <string.h>
#include <sys/socket.h>
#include <netinet/in.h>

static inline CURLcode ch_easy_setopt_long(CURL *h, CURLoption o, long v) { return curl_easy_setopt(h, o, v); }
static inline CURLcode ch_easy_setopt_off(CURL *h, CURLoption o, curl_off_t v) { return curl_easy_setopt(h, o, v); }
static inline CURLcode ch_easy_setopt_string(CURL *h, CURLoption o, const char *v) { return curl_easy_setopt(h, o, v); }
static inline CURLcode ch_easy_setopt_pointer(CURL *h, CURLoption o, void *v) { return curl_easy_setopt(h, o, v); }
static inline CURLcode ch_easy_setopt_slist(CURL *h, CURLoption o, struct curl_slist *v) { return curl_easy_setopt(h, o, v); }
static inline CURLcode ch_easy_setopt_write_function(CURL *h, curl_write_callback f) {
    return curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, f);
}
static inline CURLcode ch_easy_setopt_opensocket_function(CURL *h, curl_opensocket_callback f) {
    return curl_easy_setopt(h, CURLOPT_OPENSOCKETFUNCTION, f);
}

static inline CURLcode ch_easy_getinfo_long(CURL *h, CURLINFO i, long *v) { return curl_easy_getinfo(h, i, v); }
static inline CURLcode ch_easy_getinfo_off(CURL *h, CURLINFO i, curl_off_t *v) { return curl_easy_getinfo(h, i, v); }
static inline CURLcode ch_easy_getinfo_pointer(CURL *h, CURLINFO i, void **v) { return curl_easy_getinfo(h, i, v); }

static inline CURLMcode ch_multi_setopt_long(CURLM *m, CURLMoption o, long v) { return curl_multi_setopt(m, o, v); }

/// The easy handle and result of a finished transfer (CURLMsg's union, read from C).
static inline CURL *ch_msg_easy(CURLMsg *m) { return m->easy_handle; }
static inline int ch_msg_is_done(CURLMsg *m) { return m->msg == CURLMSG_DONE; }
static inline CURLcode ch_msg_result(CURLMsg *m) { return m->data.result; }

/// The address libcurl is about to connect to, copied out of the curl_sockaddr (whose `addr`
/// member is declared as a 16-byte sockaddr but holds a sockaddr_in6 for IPv6). Returns the
/// family (AF_INET: 4 bytes written, AF_INET6: 16 bytes written) or -1.
static inline int ch_sockaddr_address(const struct curl_sockaddr *a, unsigned char out[16]) {
    if (a->family == AF_INET && a->addrlen >= sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *v4 = (const struct sockaddr_in *)&a->addr;
        memcpy(out, &v4->sin_addr, 4);
        return AF_INET;
    }
    if (a->family == AF_INET6 && a->addrlen >= sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *v6 = (const struct sockaddr_in6 *)&a->addr;
        memcpy(out, &v6->sin6_addr, 16);
        return AF_INET6;
    }
    return -1;
}

#endif
