-- Sign-in limits (issue 15): attempts per login and per client address within a window,
-- shared by every replica. An attempt is reserved (atomically counted) BEFORE the password
-- is checked, so parallel guesses can never get more checks than the limit; a successful
-- sign-in gives its reservations back. Rows older than the window are deleted as new
-- attempts arrive, so the table stays bounded by the attempts of one window.
CREATE TABLE sign_in_limits (
    limit_key    TEXT PRIMARY KEY,
    window_start TEXT NOT NULL,
    attempts     BIGINT NOT NULL
);
CREATE INDEX sign_in_limits_window ON sign_in_limits (window_start);
