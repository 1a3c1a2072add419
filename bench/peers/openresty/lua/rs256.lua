-- RS256 (RSASSA-PKCS1-v1_5 with SHA-256) verification through LuaJIT FFI
-- to the system's libcrypto.so.3, plus the strict base64url decoding JWS
-- needs. Debian ships no lua-resty-rsa / lua-resty-jwt, so this is the
-- small piece of our own that an OpenResty engineer would write.
--
-- Keys are parsed once (init_by_lua, before the fork), never per request:
-- parsing a PEM costs more than verifying with it. Each verification is
-- EVP_DigestVerifyInit + EVP_DigestVerify on a fresh EVP_MD_CTX (a few
-- hundred ns of allocation next to ~30 us of RSA).
local ffi = require "ffi"
local b64 = require "ngx.base64"

local C = ffi.load("libcrypto.so.3")

-- One cdef per declaration: a type another module declared already must
-- not make the rest fail.
for _, decl in ipairs {
  "typedef struct bio_st BIO;",
  "typedef struct evp_pkey_st EVP_PKEY;",
  "typedef struct evp_pkey_ctx_st EVP_PKEY_CTX;",
  "typedef struct evp_md_ctx_st EVP_MD_CTX;",
  "typedef struct evp_md_st EVP_MD;",
  "typedef struct engine_st ENGINE;",
  "typedef struct rsa_st RSA;",
  "BIO *BIO_new_mem_buf(const void *buf, int len);",
  "int BIO_free(BIO *a);",
  "EVP_PKEY *PEM_read_bio_PUBKEY(BIO *bp, EVP_PKEY **x, void *cb, void *u);",
  "RSA *PEM_read_bio_RSAPublicKey(BIO *bp, RSA **x, void *cb, void *u);",
  "EVP_PKEY *EVP_PKEY_new(void);",
  "int EVP_PKEY_set1_RSA(EVP_PKEY *pkey, RSA *key);",
  "void RSA_free(RSA *r);",
  "void EVP_PKEY_free(EVP_PKEY *pkey);",
  "int EVP_PKEY_get_base_id(const EVP_PKEY *pkey);",
  "int EVP_PKEY_get_bits(const EVP_PKEY *pkey);",
  "EVP_MD_CTX *EVP_MD_CTX_new(void);",
  "void EVP_MD_CTX_free(EVP_MD_CTX *ctx);",
  "const EVP_MD *EVP_sha256(void);",
  "int EVP_DigestVerifyInit(EVP_MD_CTX *ctx, EVP_PKEY_CTX **pctx, const EVP_MD *type,"
    .. " ENGINE *e, EVP_PKEY *pkey);",
  "int EVP_DigestVerify(EVP_MD_CTX *ctx, const unsigned char *sig, size_t siglen,"
    .. " const unsigned char *tbs, size_t tbslen);",
  "void ERR_clear_error(void);",
  "int RAND_bytes(unsigned char *buf, int num);",
  "unsigned char *SHA256(const unsigned char *d, size_t n, unsigned char *md);",
} do
  pcall(ffi.cdef, decl)
end

local EVP_PKEY_RSA = 6 -- NID_rsaEncryption; RSA-PSS-only keys are refused
local SHA256 = C.EVP_sha256()

local M = {}

local digest_buf = ffi.new("unsigned char[32]")

-- SHA-256 of `s`, 32 raw bytes: the token cache's key. Keying by the
-- token itself keeps thousands of ~600-byte strings alive in LuaJIT's
-- string table, and this LuaJIT hashes long strings from a few sampled
-- bytes, which tokens of one issuer share: every new token string then
-- walks a long collision chain (measured: most of the worker's time).
-- A short digest is hashed whole; SHA-256, as the gateway's cache uses,
-- so no two tokens share a key.
function M.sha256(s)
  C.SHA256(s, #s, digest_buf)
  return ffi.string(digest_buf, 32)
end

-- The same digest of the `n` bytes at `p + skip` (a pointer): the token
-- of an Authorization header read in place.
function M.sha256_at(p, skip, n)
  C.SHA256(p + skip, n, digest_buf)
  return ffi.string(digest_buf, 32)
end

-- Parses one PEM public key: SPKI ("BEGIN PUBLIC KEY") or PKCS#1 ("BEGIN
-- RSA PUBLIC KEY"), as the gateway accepts. Private keys and keys outside
-- 2048..8192 bits are refused, as the gateway refuses them at start-up.
-- Returns an EVP_PKEY* (kept for the life of the process) or nil, err.
function M.load_public_key(pem)
  local pkey
  local bio = C.BIO_new_mem_buf(pem, #pem)
  if pem:find("-----BEGIN PUBLIC KEY-----", 1, true) then
    pkey = C.PEM_read_bio_PUBKEY(bio, nil, nil, nil)
  elseif pem:find("-----BEGIN RSA PUBLIC KEY-----", 1, true) then
    local rsa = C.PEM_read_bio_RSAPublicKey(bio, nil, nil, nil)
    if rsa ~= nil then
      pkey = C.EVP_PKEY_new()
      if C.EVP_PKEY_set1_RSA(pkey, rsa) ~= 1 then
        C.EVP_PKEY_free(pkey)
        pkey = nil
      end
      C.RSA_free(rsa)
    end
  else
    C.BIO_free(bio)
    if pem:find("PRIVATE KEY-----", 1, true) then
      return nil, "this is a private key; configure the public half (BEGIN PUBLIC KEY)"
    end
    return nil, "no BEGIN PUBLIC KEY or BEGIN RSA PUBLIC KEY block"
  end
  C.BIO_free(bio)
  C.ERR_clear_error()
  if pkey == nil then
    return nil, "not a readable RSA public key"
  end
  if C.EVP_PKEY_get_base_id(pkey) ~= EVP_PKEY_RSA then
    C.EVP_PKEY_free(pkey)
    return nil, "not an RSA key"
  end
  local bits = C.EVP_PKEY_get_bits(pkey)
  if bits < 2048 or bits > 8192 then
    C.EVP_PKEY_free(pkey)
    return nil, "RSA key is " .. bits .. " bits; 2048 to 8192 required"
  end
  return pkey
end

-- true when `sig` (raw bytes) is a valid RS256 signature of `data` by `pkey`.
function M.verify(pkey, data, sig)
  local ctx = C.EVP_MD_CTX_new()
  if ctx == nil then
    return false
  end
  local ok = C.EVP_DigestVerifyInit(ctx, nil, SHA256, nil, pkey) == 1
    and C.EVP_DigestVerify(ctx, sig, #sig, data, #data) == 1
  C.EVP_MD_CTX_free(ctx)
  if not ok then
    C.ERR_clear_error() -- a failed verify leaves an entry on OpenSSL's queue
  end
  return ok
end

-- Unpadded base64url, strict like the gateway's decoder (Rust `base64`,
-- URL_SAFE_NO_PAD): nginx's decoder already refuses foreign characters and
-- a length of 4n+1, but it ignores non-zero bits in the last character,
-- which the gateway refuses. The caller has already checked the alphabet
-- (the whole token is [A-Za-z0-9_.-]), so no "=" can reach here.
local value = {}
do
  local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
  for i = 1, 64 do
    value[alphabet:byte(i)] = i - 1
  end
end

function M.b64url_decode(s)
  local rem = #s % 4
  if rem == 2 or rem == 3 then
    local last = value[s:byte(#s)]
    -- 2 chars carry 8 bits (4 spare), 3 chars carry 16 bits (2 spare).
    if not last or last % (rem == 2 and 16 or 4) ~= 0 then
      return nil
    end
  end
  return b64.decode_base64url(s)
end

-- `n` bytes from OpenSSL's CSPRNG (request ids), or nil.
function M.random_bytes(buf, n)
  return C.RAND_bytes(buf, n) == 1
end

return M
