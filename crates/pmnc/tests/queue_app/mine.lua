return { note = function(i) pmnc.state.set('own:' .. i, true) return i end }
