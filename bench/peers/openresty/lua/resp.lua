-- A small RESP2 client on ngx.socket.tcp (Debian has no lua-resty-redis).
--
-- One request borrows one connection from nginx's cosocket keepalive pool
-- (M.connect), runs its commands and gives it back (M.release), so the
-- steady state is one Redis round trip per command with no connect. A
-- connection that saw a transport error or a timeout is closed, never
-- pooled: its reply stream may be half read.
--
-- Replies: integers as numbers, bulk and simple strings as strings, nil
-- bulks as nil, arrays as tables. An error reply returns nil, the Redis
-- message ("NOSCRIPT ...") and true (the connection stays usable);
-- a transport failure returns nil and "redis: <why>".
local tcp = ngx.socket.tcp
local sub, byte = string.sub, string.byte
local tonumber = tonumber

local M = {}

-- Set once by M.configure (from the rendered nginx.conf).
local cfg = {
  host = "127.0.0.1", port = 6379, db = 0, password = nil, username = nil,
  connect_ms = 1000, send_ms = 1000, read_ms = 2000,
  pool_size = 256, idle_ms = 60000,
}

function M.configure(t)
  for k, v in pairs(t) do
    cfg[k] = v
  end
end

-- "*3\r\n$4\r\nHGET\r\n..." for one command, as a table of pieces that
-- sock:send gathers in C. Not concat'ed into one Lua string on purpose:
-- every such string is interned, and this LuaJIT (Debian's luajit2, built
-- without SSE4.2) hashes a long string from 4 sampled spots only, so the
-- commands of one sale (same length, same bytes there) all land in one
-- hash chain and interning them costs a memcmp walk down that chain
-- (measured: 5.7k admissions/s with one string per command, 20k without).
local function encode(args)
  local n = #args
  local out = { "*", n, "\r\n" }
  local i = 4
  for j = 1, n do
    local a = tostring(args[j])
    out[i], out[i + 1], out[i + 2], out[i + 3] = "$", #a, "\r\n", a
    out[i + 4] = "\r\n"
    i = i + 5
  end
  return out
end
M.encode = encode

local read_reply

-- Reads one reply. Error replies nested in an array become {err = msg}.
read_reply = function(sock)
  local line, err = sock:receive("*l")
  if not line then
    return nil, "redis: " .. tostring(err)
  end
  local kind, rest = byte(line), sub(line, 2)
  if kind == 58 then -- ':' integer
    return tonumber(rest)
  elseif kind == 36 then -- '$' bulk string
    local len = tonumber(rest)
    if not len then
      return nil, "redis: bad bulk length"
    end
    if len < 0 then
      return nil -- a nil bulk: no error
    end
    local data, e = sock:receive(len + 2)
    if not data then
      return nil, "redis: " .. tostring(e)
    end
    return sub(data, 1, len)
  elseif kind == 43 then -- '+' simple string
    return rest
  elseif kind == 45 then -- '-' error reply
    return nil, rest, true
  elseif kind == 42 then -- '*' array
    local n = tonumber(rest)
    if not n then
      return nil, "redis: bad array length"
    end
    if n < 0 then
      return nil
    end
    local t = {}
    for i = 1, n do
      local v, e, server = read_reply(sock)
      if e then
        if not server then
          return nil, e
        end
        v = { err = e }
      end
      t[i] = v == nil and ngx.null or v
    end
    return t
  end
  return nil, "redis: unexpected reply type " .. sub(line, 1, 1)
end
M.read_reply = read_reply

-- One command on `sock`: reply, or nil + err (+ true for an error reply).
local function call(sock, args)
  local ok, err = sock:send(encode(args))
  if not ok then
    return nil, "redis: " .. tostring(err)
  end
  return read_reply(sock)
end
M.call = call

-- A connection from the pool (AUTH and SELECT only on a new one).
function M.connect()
  local sock = tcp()
  sock:settimeouts(cfg.connect_ms, cfg.send_ms, cfg.read_ms)
  local ok, err = sock:connect(cfg.host, cfg.port)
  if not ok then
    return nil, "redis: connect " .. cfg.host .. ":" .. cfg.port .. ": " .. tostring(err)
  end
  if sock:getreusedtimes() == 0 then
    if cfg.password then
      local args = cfg.username and { "AUTH", cfg.username, cfg.password }
        or { "AUTH", cfg.password }
      local _, e = call(sock, args)
      if e then
        sock:close()
        return nil, "redis: AUTH: " .. e
      end
    end
    if cfg.db and cfg.db ~= 0 then
      local _, e = call(sock, { "SELECT", cfg.db })
      if e then
        sock:close()
        return nil, "redis: SELECT: " .. e
      end
    end
  end
  return sock
end

-- Back to the pool when the last reply was read whole; closed otherwise.
function M.release(sock, broken)
  if broken then
    sock:close()
  else
    sock:setkeepalive(cfg.idle_ms, cfg.pool_size)
  end
end

-- Runs one command on a pooled connection: the reply, or nil + err
-- (+ true for a Redis error reply).
function M.command(...)
  local sock, err = M.connect()
  if not sock then
    return nil, err
  end
  local res, e, server = call(sock, { ... })
  M.release(sock, e ~= nil and not server)
  return res, e, server
end

-- EVALSHA with a fallback to SCRIPT LOAD when Redis does not know the
-- script (restarted, flushed, failed over) and one retry, on one
-- connection: the reply, or nil + err.
function M.evalsha(sock, sha, source, keys, args)
  local cmd = { "EVALSHA", sha, #keys }
  for i = 1, #keys do
    cmd[#cmd + 1] = keys[i]
  end
  for i = 1, #args do
    cmd[#cmd + 1] = args[i]
  end
  local res, err, server = call(sock, cmd)
  if err and server and sub(err, 1, 8) == "NOSCRIPT" then
    local _, e = call(sock, { "SCRIPT", "LOAD", source })
    if e then
      return nil, "redis: SCRIPT LOAD: " .. e, true
    end
    res, err, server = call(sock, cmd)
  end
  return res, err, server
end

return M
