"""Builds minilm_train.txt, the distillation sentences for the MiniLM benchmark.

Why this script exists: the short distillation run (the pruned all-MiniLM-L6-v2
is trained to reproduce the dense model's sentence embeddings) wants more than a
thousand different sentences, and nothing may be downloaded, so no public corpus
can be used. The file is therefore HAND (hand-written full sentences, kept here
so that the output can be rebuilt from one place) followed by sentences that
combine hand-written templates and vocabulary lists with a fixed seed.

The output is deterministic and committed next to this script; rerun it only
after editing it:

    python benchmarks/data/make_minilm_train.py

Lines that also appear in minilm_eval.txt or minilm_calib.txt are dropped, so
eval sentences never reach training.
"""
import itertools
import pathlib
import random

HERE = pathlib.Path(__file__).resolve().parent
SEED = 20240613
PER_FAMILY = 75

HAND = """\
The recipe works just as well with brown rice, but it needs twenty extra minutes.
A sharp knife is safer than a dull one because it doesn't slip.
My uncle grows peppers so hot that nobody in the family will eat them.
Let the steak rest for five minutes before slicing it.
Why does my cake sink in the middle after baking?
Opening the oven door too early can make a cake collapse.
Toast the spices in a dry pan to bring out their aroma.
She makes dumplings from scratch every New Year's Eve.
The soup tastes even better the day after you make it.
Marinate the chicken overnight in yogurt, lemon and garlic.
Use day-old bread for French toast so it soaks up the custard.
Is it safe to eat raw cookie dough?
Raw flour and raw eggs can both carry bacteria, so it's best avoided.
The café roasts its own beans in a small machine by the window.
A pressure cooker can make tough cuts of beef tender in under an hour.
I always burn the first pancake.
Whisk the egg whites until they form stiff peaks.
Grill the vegetables over medium heat until they are lightly charred.
Pickled cucumbers keep for months in a cool cellar.
Stir-fries cook fast, so chop everything before you turn on the stove.
Can you freeze cooked pasta?
The curry was so spicy that my eyes watered.
My kids will eat broccoli only if it's covered in cheese.
Add the herbs at the end so they stay bright and fresh.
The physics lecture covered Newton's three laws of motion.
An object in motion stays in motion unless a force acts on it.
Light from the sun takes about eight minutes to reach Earth.
Sound travels faster through water than through air.
Why is the ocean salty but rivers are not?
Rivers carry dissolved minerals to the sea, where water evaporates and the salt stays behind.
Jupiter is so large that more than a thousand Earths could fit inside it.
Atoms are mostly empty space.
The periodic table arranges elements by their atomic number.
Water expands when it freezes, which is why ice floats.
What is the difference between weather and climate?
Weather is what happens today; climate is the average over decades.
The telescope can see galaxies that formed billions of years ago.
Magnets have a north and a south pole, and like poles repel each other.
The human brain uses about a fifth of the body's energy.
Bacteria can double in number every twenty minutes under ideal conditions.
Fossils show that whales evolved from land mammals.
A rainbow forms when sunlight is bent and reflected inside raindrops.
The speed of light is roughly 300,000 kilometers per second.
Pluto was reclassified as a dwarf planet in 2006.
Our team lost in overtime after leading for most of the game.
The goalkeeper punched the ball clear at the last moment.
She set a new national record in the 400-meter hurdles.
How many players are on a rugby team?
The stadium erupted when the underdogs scored the winning goal.
He has been cycling in the Alps every summer for twenty years.
The fans sang all the way through the second half.
The coach was fired after five straight losses.
The pitcher threw a perfect game on Sunday afternoon.
Is golf really a good form of exercise?
Walking an eighteen-hole course can cover about ten kilometers.
The boxer retired undefeated after thirty-one fights.
The relay team dropped the baton on the final exchange.
Ski resorts opened early this year thanks to heavy November snow.
The ice hockey match went to a shootout.
I joined a volleyball league that plays on the beach on Thursdays.
The referee's decision was overturned after a video review.
The company's shares jumped after it beat profit forecasts.
Unemployment fell to its lowest level in a decade.
Should I pay off my student loans or invest first?
Paying off high-interest debt is usually the better return.
The central bank kept interest rates unchanged this month.
Housing prices in the capital rose eight percent last year.
An emergency fund should cover three to six months of expenses.
The merger still needs approval from regulators in Brussels.
My bank charged me a fee for using another bank's ATM.
Index funds spread your money across hundreds of companies at low cost.
The budget deficit grew because tax revenue fell during the recession.
Small businesses were hit hardest by the rising cost of energy.
What is the difference between a Roth IRA and a traditional IRA?
The currency lost a third of its value against the dollar.
The startup was valued at two billion dollars after its latest round.
Retailers expect holiday sales to be flat compared with last year.
She negotiated a ten percent raise by showing her results.
The pension fund invests mostly in bonds and real estate.
We spent a week driving along the coast of Portugal.
The old town is best explored on foot.
Do I need a visa to visit Japan as a tourist?
Many countries let tourists stay for ninety days without a visa.
Pack light; you can always buy what you forget.
The hostel had bunk beds, a shared kitchen and friendly staff.
Our train through the Swiss mountains passed dozens of tunnels.
Exchange a little cash before you land, just in case.
The night market in Taipei is famous for its street food.
We missed our connecting flight and spent the night in the airport.
Travel insurance covered the cost of our cancelled trip.
The view from the top of the tower was worth the long climb.
Which is the cheapest way to get from the airport to the city center?
The airport express train takes twenty minutes and runs every quarter hour.
The cruise ship stopped at four islands in seven days.
I always get a window seat so I can sleep against the wall.
The campsite by the lake fills up months in advance.
We rented a small car because the village streets are narrow.
Our luggage arrived two days after we did.
The desert tour included a night sleeping under the stars.
The doctor ordered a blood test to check my iron levels.
Drink plenty of fluids and rest if you have a cold.
How long is a cold contagious?
Most people are contagious for the first few days of symptoms.
The clinic offers free vaccinations for children under five.
Wash your hands for at least twenty seconds with soap.
He broke his wrist falling off a skateboard.
The X-ray showed a small crack in the bone.
Physical therapy helped her walk again after the knee surgery.
Headaches can be caused by dehydration, stress or poor sleep.
When should I see a doctor about a persistent cough?
A cough that lasts more than three weeks should be checked.
The nurse taught me how to use the inhaler properly.
Vitamin D is made in the skin when it is exposed to sunlight.
The hospital is short of nurses on the night shift.
Too much salt can raise your blood pressure.
My eye doctor says I need reading glasses now.
She is recovering well after the operation.
The new drug lowered the risk of stroke by a quarter in the trial.
A sprained ankle should be iced and kept elevated.
The function returns None when the input list is empty.
Write unit tests before you refactor a large module.
How do I read a CSV file in Python?
The csv module or pandas can both load a CSV file in a few lines.
Memory usage grew until the server crashed at midnight.
A memory leak keeps allocating space that is never freed.
The API returns a 404 error when the resource does not exist.
Use environment variables instead of hardcoding secrets in your code.
The build failed because a dependency was missing.
JavaScript runs in the browser, while Node lets it run on servers.
What does the error "null pointer exception" mean?
It means the program tried to use an object that was never created.
Recursion solves a problem by calling the same function on a smaller input.
Code reviews catch bugs and spread knowledge across the team.
The website went down for an hour during the product launch.
Docker packages an application with everything it needs to run.
Always close database connections when you are done with them.
The compiler warned that the variable was never used.
A hash map gives you fast lookups by key.
Sorting a million numbers takes less than a second on a modern laptop.
The script renames every photo in the folder by the date it was taken.
Comment your code to explain why, not what.
Our app stores user preferences in a small SQLite database.
The new release drops support for Windows 7.
Open source projects depend on volunteers to review patches.
The lawyer advised him not to sign the agreement yet.
A will tells the court how to divide your property after you die.
The tenant sued the landlord over the unreturned deposit.
Copyright protects the expression of an idea, not the idea itself.
Can my employer read my work emails?
In many places, companies can monitor accounts they own and provide.
The supreme court will hear the case in October.
The defense asked for a new trial because of a juror's misconduct.
Speeding fines double in school zones.
He was arrested for driving without a license.
The patent expires after twenty years.
Small claims court handles disputes under a certain amount of money.
The law requires restaurants to list allergens on the menu.
The company settled the lawsuit for three million dollars.
The witness refused to answer on the advice of her attorney.
The band's new single is all over the radio.
She writes songs on an old upright piano in her living room.
The drummer kept perfect time through a ten-minute solo.
Jazz grew out of blues and ragtime in New Orleans.
How do I learn to read sheet music?
Start with the notes on the treble clef and simple rhythms.
The festival headliner canceled because of a throat infection.
Vinyl records have made a surprising comeback.
The choir sang in four-part harmony without any accompaniment.
The cellist performed the suite entirely from memory.
My neighbor practices the trumpet at seven in the morning.
The song was written in a single afternoon.
Streaming services pay artists a fraction of a cent per play.
The opera lasted almost four hours, with two intermissions.
He learned to play the drums by watching videos online.
It's been cloudy for eleven days straight.
The heat wave broke records in three countries.
Hail the size of golf balls dented cars across the town.
Is it going to be windy at the beach tomorrow?
Strong winds are expected along the coast in the afternoon.
The fog was so thick that we couldn't see the end of the street.
Spring arrived early, and the cherry trees bloomed in March.
A tornado warning was issued for three counties.
The temperature dropped fifteen degrees in an hour.
Autumn leaves are brightest after sunny days and cool nights.
The drought ended with a week of steady rain.
Humidity makes the heat feel much worse than it is.
Frost is likely in low-lying areas tonight.
The monsoon usually reaches the region in early June.
The first snow of the season fell overnight.
The pyramids of Giza were built more than 4,500 years ago.
The Berlin Wall fell in November 1989.
Medieval castles were designed to survive long sieges.
Who was the first emperor of China?
Qin Shi Huang unified China in 221 BC.
The Silk Road connected traders from China to the Mediterranean.
The Industrial Revolution began in Britain in the late 1700s.
Vikings sailed as far as North America around the year 1000.
The ancient Greeks held the first Olympic Games in 776 BC.
The French Revolution began with the storming of the Bastille.
Many medieval towns grew up around a market square.
The telegraph let news cross oceans in minutes instead of weeks.
Historians still debate what caused the Bronze Age collapse.
The Black Death killed about a third of Europe's population.
The printing of the first newspapers began in the 1600s.
The dog refuses to go outside when it's raining.
Our parrot can say hello in three languages.
How often should I feed my goldfish?
A small pinch once or twice a day is plenty.
The rabbit escaped from its hutch and ate all the lettuce.
Older cats may need special food that is easier to digest.
Our dog is afraid of the vacuum cleaner.
The hamster runs on its wheel all night long.
The shelter has dozens of dogs waiting for a home.
Brush your dog's teeth a few times a week.
Is it normal for a puppy to sleep most of the day?
Puppies need up to twenty hours of sleep as they grow.
The cat brought a dead mouse to the back door as a gift.
Tortoises can live for more than a hundred years.
Our vet recommends a yearly checkup for pets.
The tires need to be rotated every ten thousand kilometers.
My car won't start on cold mornings.
A weak battery is the most common reason a car won't start in winter.
He restored a 1967 convertible in his garage.
Hybrid cars switch between a gasoline engine and an electric motor.
What does the orange warning light on my dashboard mean?
The car rental company charged me for a scratch I didn't make.
Self-driving cars are being tested on city streets.
The mechanic said the timing belt needs replacing.
Winter tires give better grip on snow and ice.
She passed her driving test on the first try.
Parking downtown costs four dollars an hour.
The new model gets fifty kilometers more range than last year's.
Always check your mirrors before changing lanes.
The truck's brakes failed on the steep hill.
Plant garlic in autumn for a harvest the next summer.
The compost pile should be turned every couple of weeks.
Which vegetables grow well in the shade?
Lettuce, spinach and kale tolerate partial shade.
Slugs ate every one of my young lettuce plants.
Mulch keeps the soil moist and smothers weeds.
My orchids bloom every winter on the kitchen windowsill.
Prune fruit trees while they are dormant.
The community garden has a waiting list for plots.
Water the garden early in the morning to reduce evaporation.
Sunflowers turn to follow the sun when they are young.
The apple tree needs another variety nearby to produce fruit.
Raised beds warm up faster in spring.
Dandelions are edible, roots and all.
Is it too late to plant bulbs in December?
The school is hiring two new science teachers for the fall.
Homework should reinforce what was taught in class, not replace it.
How can I help my child with math if I struggled with it myself?
Ask your child to explain the problem to you in their own words.
The university raised tuition by four percent.
Group projects teach students to divide work and meet deadlines.
The teacher reads aloud to the class every Friday afternoon.
Scholarships are available for students with financial need.
She earned her doctorate in marine biology at thirty-two.
The kindergarten class planted beans in paper cups.
Final grades will be posted online next Monday.
Many students work part-time jobs to pay for college.
The principal announced a new policy banning phones during lessons.
Learning to code is now part of the primary school curriculum.
He failed the driving theory exam twice before passing.
The classroom smelled of chalk and floor polish.
Our history teacher made every lesson feel like a story.
Recycling bins were installed on every floor of the office.
The river is cleaner now than it has been in fifty years.
Plastic bottles can take hundreds of years to break down.
Why are some plastics not accepted for recycling?
Many mixed plastics are too costly to sort and reprocess.
The city plans to plant ten thousand trees by 2030.
Wind and solar now produce a third of the country's electricity.
Reusable bags are more eco-friendly only if you use them many times.
Composting food scraps reduces methane from landfills.
The forest fire burned through twenty thousand hectares.
Air pollution is worst on still winter days.
Electric buses will replace the diesel fleet within five years.
Coral reefs cover a tiny part of the ocean but shelter a quarter of marine species.
Deforestation threatens orangutans in Borneo and Sumatra.
The new phone has three cameras and a foldable screen.
My tablet froze and won't turn on.
Hold the power button for fifteen seconds to force a restart.
Is it worth buying an extended warranty for a laptop?
The smartwatch counts my steps and tracks my sleep.
Noise-canceling headphones make long flights much more bearable.
I switched to a cheaper phone plan with unlimited data.
The screen cracked when I dropped my phone on the stairs.
Cloud storage lets you access your files from any device.
The keyboard on this laptop is surprisingly comfortable.
The company stopped sending software updates for my old phone.
Voice assistants can set timers, play music and answer simple questions.
Turn on automatic updates so you don't miss security fixes.
The game console sold out within minutes of going on sale.
Scammers often pretend to be from your bank and ask for a code.
Never click links in unexpected text messages.
Someone tried to log into my account from another country.
Change your password right away if a site reports a data breach.
The hackers demanded a ransom to unlock the hospital's files.
Encryption scrambles data so only the intended reader can see it.
What is a VPN and do I need one?
A VPN hides your traffic from others on the same network.
The employees completed a training course on spotting fake emails.
The subway line will be closed for repairs all weekend.
Buses replace trains between the two stations on Sundays.
The taxi driver took the long way to raise the fare.
Ride-sharing apps have changed how people get around at night.
How much is a monthly pass for public transport?
Monthly passes cost less than buying two tickets a day.
The tram stops right in front of the museum.
Road works on the ring road will last until August.
The new metro line connects the airport to the city center.
I bike along the canal to avoid the traffic.
The ferry crossing takes forty minutes in good weather.
Scooters are now banned from the sidewalks downtown.
The highway was closed after a truck overturned.
Carpooling cuts fuel costs and traffic.
The moving truck got stuck under a low bridge.
We spent the whole weekend packing boxes.
The new apartment has a balcony and a view of the park.
Rent in the city center has doubled in ten years.
Is renter's insurance worth it?
It is cheap and covers your belongings if there is a fire or theft.
The house needs a new roof before winter.
We painted the nursery a soft yellow.
The neighbors complained about the noise from our party.
Buying a home costs more than the price; there are fees and taxes too.
The landlord agreed to let us have a cat.
The old building was converted into loft apartments.
The realtor showed us six houses in one afternoon.
Our basement floods every time it rains hard.
Smoke detectors should be tested once a month.
I got the job!
The hiring manager called to offer me the position.
The company is laying off two hundred workers.
Ask for feedback after a rejection; it can help next time.
Remote work saved me two hours of commuting every day.
How do I ask my boss for a raise?
Bring evidence of your results and a specific number.
She quit her job in finance to open a bakery.
The internship could lead to a full-time role.
A good manager removes obstacles instead of adding them.
The office moved to an open plan, and everyone hated it.
My coworker keeps scheduling meetings during lunch.
The night shift pays more but is hard on your health.
Networking events help you meet people in your field.
The union negotiated a new contract with better holiday pay.
We hired a freelancer to redesign our website.
Filing taxes online is faster than mailing paper forms.
The government sent out tax refunds earlier than usual.
Can I deduct the cost of my home office?
Only if the space is used regularly and only for work.
Sales tax varies from state to state.
Property taxes rose again this year.
The new budget cuts taxes for low-income families.
Keep your tax records for at least seven years.
An accountant can save you more than her fee.
Sleepwalking is more common in children than adults.
A short nap after lunch can improve focus.
Naps longer than thirty minutes can leave you groggy.
Why do we dream?
Scientists still don't fully understand why we dream.
Caffeine can stay in your system for six hours or more.
He snores so loudly that his wife sleeps in the guest room.
A consistent bedtime helps children sleep better.
Blue light from screens can delay the release of melatonin.
Night shifts disrupt the body's internal clock.
Insomnia often improves with changes to evening habits.
My dentist recommends flossing once a day.
The dental cleaning took forty-five minutes.
Sugary drinks are one of the main causes of tooth decay.
Baby teeth start falling out around age six.
Braces usually stay on for one to two years.
Is it bad to brush your teeth right after eating?
Wait thirty minutes after acidic foods before brushing.
The wisdom tooth had to be removed under local anesthesia.
Whole grains keep you full longer than white bread.
Nuts are high in calories but full of healthy fats.
Skipping breakfast doesn't necessarily lead to weight gain.
How much water should I drink every day?
Most people get enough by drinking when they are thirsty.
Fruit juice has almost as much sugar as soda.
Beans and lentils are cheap sources of protein and fiber.
The dietitian suggested smaller portions rather than a strict diet.
Strength training twice a week helps protect your bones.
Walking after dinner can lower blood sugar.
Warm up for ten minutes before a hard workout.
The gym is quietest in the middle of the afternoon.
Stretching after exercise may reduce stiffness the next day.
Is it better to exercise in the morning or the evening?
The best time to work out is the time you'll actually stick to.
She does push-ups during every commercial break.
Pilates focuses on core strength and control.
The crows outside my window seem to recognize me.
Eagles build huge nests that they reuse for years.
A woodpecker has been drumming on our gutter all week.
Parrots can live for more than fifty years.
The flamingos were pink because of the shrimp they eat.
Butterflies taste with their feet.
Ants can carry many times their own body weight.
Wasps are useful in the garden because they eat pests.
The hive produced twenty kilograms of honey this year.
Fireflies light up to attract mates.
The fish were biting early this morning.
He caught a salmon weighing nine kilograms.
Catch-and-release fishing lets the fish go back into the water.
Overfishing has emptied many of the world's fisheries.
The harbor is full of small fishing boats at dawn.
We built a campfire and roasted marshmallows.
Always leave the campsite cleaner than you found it.
The trail climbs steeply for the first three kilometers.
Our tent leaked during the night, and everything got wet.
Is it safe to drink water from a mountain stream?
Filter or boil stream water before drinking it.
The rock climbers set off before sunrise.
The gallery is showing a retrospective of her early work.
Sculpture is harder to photograph than painting.
He draws cartoons for the local newspaper.
The mural covers the entire side of the building.
Which paint should I use on kitchen cabinets?
A durable enamel paint holds up best to cleaning.
My camera's autofocus struggles in low light.
She photographs weddings on weekends and teaches during the week.
Shoot in RAW if you want more control when editing.
The exhibition features photos from the 1960s civil rights movement.
The sequel was better than the original movie.
We watched three horror films back to back.
The actor won an award for playing a retired boxer.
Subtitles ruin the movie for some people.
The cinema has reclining seats and serves dinner.
The documentary follows a family of elephants for a year.
I read about fifty books a year, mostly on my phone.
The book club meets on the first Monday of each month.
Her debut novel was shortlisted for a major prize.
Which book should I read next?
The library's used book sale raises money for children's programs.
Poetry sounds better when it's read aloud.
The candidates debated for two hours on live television.
Turnout was the highest in thirty years.
The senator announced she would not run again.
Votes are still being counted in several districts.
The referendum passed by a narrow margin.
The bride's grandmother made the wedding dress.
The groom forgot the rings in the hotel room.
They are celebrating their fiftieth wedding anniversary in June.
She opened her presents before breakfast.
We sang happy birthday in three languages.
The baby took her first steps yesterday.
Toddlers learn dozens of new words every month.
Parents of newborns lose hundreds of hours of sleep in the first year.
How do I get my toddler to eat vegetables?
Offer new foods many times without pressure.
The kids are building a treehouse with their grandfather.
The grandmaster played twenty opponents at once.
He lost the game after blundering his queen.
The tournament uses a fast time control of five minutes per player.
The game's open world is huge and beautiful.
I've been stuck on the final level for days.
Board games are back in fashion.
Astronauts on the space station see sixteen sunrises a day.
The rocket landed upright on a floating platform.
The probe will reach Jupiter's moon Europa in 2030.
The telescope launched last year is already changing astronomy.
Space tourism remains too expensive for most people.
Genetic testing can reveal a higher risk of some cancers.
Scientists edited a gene to make crops resistant to drought.
Bread rises because yeast produces carbon dioxide.
Salt dissolves faster in warm water than in cold.
A fuse melts to cut the current if it gets too high.
Replace a blown fuse with one of the same rating.
The new skyscraper will be the tallest in the country.
The old stone bridge has stood for six hundred years.
The dripping faucet wastes thousands of liters a year.
The washing machine is making a loud banging noise.
An uneven load can make the machine shake during the spin cycle.
The fridge needs defrosting.
Don't mix bleach with ammonia-based cleaners.
Prices at the supermarket jumped again this month.
The butcher recommended a cheaper cut for slow cooking.
Online grocery delivery saves me an hour every week.
The restaurant lost its star after the head chef left.
The waiter recommended the lamb, and it was excellent.
We split a bottle of wine and three desserts.
The vineyard offers tastings every afternoon.
This cheese goes well with a sweet white wine.
She bakes her own chocolate truffles for the holidays.
The ice cream shop has forty flavors.
On Sunday mornings my father would make a huge pot of porridge, play old records in the kitchen and refuse to let anyone help with the dishes afterwards.
The engineers found that the crack in the dam was only a few millimeters wide, but they lowered the reservoir anyway while they studied whether it was growing.
If you are learning to drive, practice in an empty parking lot first, then on quiet residential streets, and only move to busy roads once braking and turning feel automatic.
The report recommends that the city invest in flood barriers, restore the wetlands along the river and stop issuing building permits in the most vulnerable neighborhoods.
After the museum reopened, visitors queued around the block to see the restored painting, which had been hidden behind a layer of yellowed varnish for more than a century.
When the printer jammed for the fourth time that morning, the whole office gave up and agreed to read the report on their screens instead.
Most experts recommend that beginners start investing with a low-cost index fund, contribute a fixed amount every month and avoid checking the balance every day.
The children's hospital has a garden on its roof where patients can sit among the plants, watch the birds and forget for a few minutes why they are there.
Because the bridge was closed, the delivery drivers had to take a detour through the hills that added almost an hour to every trip.
She trained for the triathlon by swimming before work, cycling on weekends and running the stairs of her apartment building every evening.
To keep houseplants alive during a long vacation, group them together in a cool room, water them thoroughly and cover the pots with a damp towel.
The new law requires landlords to register every rental property, keep records of repairs and return deposits within thirty days of the tenant leaving.
According to the survey, more than half of young adults in the city share an apartment with roommates because they cannot afford to live alone.
The old radio station, which had broadcast farm prices and weather reports since 1934, went off the air for the last time on Friday.
If your code works on your laptop but fails on the server, compare the versions of the language and libraries installed on both machines first.
The volunteers spent three days counting birds along the coast and recorded more than ninety species, including two that had not been seen there in years.
We arrived at the station five minutes after the last train had left, so we shared a taxi with a couple from Norway who were just as lost as we were.
The nurse explained that the swelling would go down in a few days if he kept the leg raised, used ice twice a day and avoided walking long distances.
Although the team played well in the first half, they could not keep up with the pace of the visitors and eventually lost by three goals.
The farmer says the late frost damaged most of the cherry blossoms, so this summer's harvest will be smaller and the fruit will cost more at the market.
"""

CITIES = ["Oslo", "Lyon", "Denver", "Osaka", "Porto", "Leeds", "Perth", "Quebec",
          "Seville", "Krakow", "Halifax", "Nairobi", "Dublin", "Busan"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NAMES = ["Maria", "Tom", "Aisha", "Kenji", "Lucia", "Omar", "Greta", "Daniel",
         "Priya", "Jonas", "Chloe", "Mateo", "Nadia", "Samuel"]


def weather(rng):
    conds = ["sunny skies", "light rain", "scattered showers", "heavy snow",
             "strong winds", "thick morning fog", "afternoon thunderstorms",
             "a mix of sun and clouds", "freezing drizzle"]
    forms = ["{c} can expect {w} on {d}, with a high of {t} degrees.",
             "Forecasters predict {w} for {c} on {d}.",
             "Will {c} get {w} again on {d}?"]
    for f, c, w, d in itertools.product(forms, CITIES, conds, DAYS):
        t = rng.randint(-8, 6) if ("snow" in w or "freezing" in w) else rng.randint(7, 31)
        yield f.format(c=c, w=w, d=d, t=t)


def journeys(rng):
    towns = ["Millbrook", "Ashford", "Kingsbury", "Redwater", "Thornton",
             "Bayview", "Elmstead", "Granton", "Wolverly", "Summerfield"]
    modes = {"train": (1, 6), "bus": (2, 8), "drive": (1, 7)}
    quals = ["if there are no delays", "on a good day", "including one change",
             "according to the timetable", "but it often takes longer"]
    for (mode, (lo, hi)), a, b, q in itertools.product(modes.items(), towns, towns, quals):
        if a != b and not (mode == "drive" and q in ("including one change",
                                                     "according to the timetable")):
            yield "The {m} from {a} to {b} takes about {n} hours, {q}.".format(
                m=mode, a=a, b=b, n=rng.randint(lo, hi), q=q)


def routines(rng):
    habits = ["goes for a run", "practices the violin", "walks the dog",
              "reads the news", "waters the garden", "cooks dinner for friends",
              "visits the farmers' market", "plays chess online",
              "writes in a journal", "calls home", "swims a few laps",
              "repairs old bicycles", "bakes bread"]
    freqs = ["every morning", "on Saturdays", "twice a week", "after work",
             "before breakfast", "once a month", "whenever it rains"]
    for n, h, f in itertools.product(NAMES, habits, freqs):
        yield "{} {} {}.".format(n, h, f)


def reviews(rng):
    products = ["blender", "vacuum cleaner", "backpack", "desk lamp",
                "coffee grinder", "rain jacket", "phone case",
                "electric toothbrush", "office chair", "rice cooker",
                "bike helmet", "wireless speaker"]
    times = ["last spring", "two months ago", "for my birthday", "on sale",
             "after reading the reviews"]
    verdicts = ["it stopped working after a week", "it still works perfectly",
                "I use it every single day", "it was not worth the money",
                "it turned out better than I expected",
                "I returned it within a few days",
                "the quality feels cheap for the price"]
    for p, t, v in itertools.product(products, times, verdicts):
        yield "I bought this {} {}, and {}.".format(p, t, v)


def business(rng):
    firms = ["Northwind Foods", "Bluefield Energy", "Harbor Logistics",
             "Crestline Motors", "Pinecone Software", "Silverlake Bank",
             "Maple Pharma", "Orchard Retail", "Redstone Airlines"]
    metrics = ["quarterly revenue", "online sales", "operating profit",
               "its number of employees", "shipments to Asia", "customer complaints"]
    moves = ["rose", "fell", "grew", "dropped", "climbed"]
    periods = ["in the first quarter", "in the second quarter", "in the third quarter",
               "over the last three months", "compared with a year earlier"]
    for f, m, v, p in itertools.product(firms, metrics, moves, periods):
        yield "{} said {} {} {} percent {}.".format(f, m, v, rng.randint(2, 35), p)


def matches(rng):
    teams = ["Riverton", "Oakridge", "Lakeside", "Eastport", "Hillcrest",
             "Westfield", "Stonebridge", "Fairhaven", "Northgate"]
    wheres = ["at home on Saturday", "in a rain-soaked match",
              "after extra time", "in front of a record crowd",
              "to reach the final", "despite losing their captain to injury"]
    for a, b, w in itertools.product(teams, teams, wheres):
        if a != b:
            hi = rng.randint(1, 5)
            yield "{} beat {} {}-{} {}.".format(a, b, hi, rng.randint(0, hi - 1), w)


def cooking(rng):
    steps = [
        ("Roast", "potatoes", (35, 50), ["golden", "crisp at the edges"]),
        ("Roast", "peppers", (20, 30), ["soft", "blistered"]),
        ("Roast", "squash", (30, 45), ["tender", "caramelized"]),
        ("Roast", "chickpeas", (25, 35), ["crunchy", "golden"]),
        ("Simmer", "lentils", (20, 30), ["soft", "creamy"]),
        ("Simmer", "tomato sauce", (20, 40), ["thick", "reduced by a third"]),
        ("Simmer", "chicken stock", (45, 90), ["rich", "reduced by half"]),
        ("Saute", "onions", (6, 12), ["soft", "lightly browned"]),
        ("Saute", "mushrooms", (5, 8), ["golden", "dry"]),
        ("Saute", "spinach", (2, 4), ["wilted", "bright green"]),
        ("Bake", "muffins", (18, 25), ["golden on top", "springy to the touch"]),
        ("Bake", "bread rolls", (15, 22), ["golden", "hollow when tapped"]),
        ("Bake", "lasagna", (35, 45), ["bubbling", "browned on top"]),
        ("Bake", "salmon", (12, 16), ["opaque", "flaking easily"]),
    ]
    for verb, ing, (lo, hi), states in steps:
        for st in states:
            yield "{} the {} for about {} minutes, until {}.".format(verb, ing, rng.randint(lo, hi), st)


def software(rng):
    parts = ["login page", "export job", "search endpoint", "mobile app",
             "nightly backup", "payment service", "image uploader", "report generator"]
    fails = ["times out", "crashes", "returns an empty result",
             "logs a misleading warning", "slows down noticeably"]
    conds = ["the input file is larger than 2 GB", "two users edit the same record",
             "the network drops for a few seconds", "the cache is cold",
             "the clocks change for daylight saving time",
             "a user name contains an apostrophe"]
    for p, f, c in itertools.product(parts, fails, conds):
        yield "The {} {} when {}.".format(p, f, c)


def opening_hours(rng):
    places = ["bakery", "pharmacy", "post office", "library", "hardware store",
              "swimming pool", "bike shop", "flower market"]
    streets = ["Elm Street", "Market Square", "River Road", "King Street",
               "Station Avenue", "Mill Lane"]
    days = ["on weekdays", "every day except Sunday", "on weekends",
            "from Tuesday to Saturday"]
    for p, s, d in itertools.product(places, streets, days):
        a = rng.randint(6, 10)
        yield "The {} on {} is open from {} a.m. to {} p.m. {}.".format(p, s, a, rng.randint(5, 9), d)


def pets(rng):
    ages = ["old", "three-year-old", "new", "rescued", "very shy"]
    animals = ["dog", "cat", "rabbit", "parrot", "guinea pig"]
    habits = ["loves sleeping in the sun", "hates the sound of the vacuum",
              "is scared of thunder", "follows us from room to room",
              "wakes us up at six every morning", "refuses to eat anything new",
              "gets excited whenever the doorbell rings"]
    for a, n, h in itertools.product(ages, animals, habits):
        yield "Our {} {} {}.".format(a, n, h)


def appointments(rng):
    kinds = ["dentist appointment", "job interview", "parent-teacher meeting",
             "haircut", "annual checkup", "car service", "physiotherapy session"]
    times = ["9:30", "11 o'clock", "noon", "2:15", "half past four"]
    for n, k, d, t in itertools.product(NAMES, kinds, DAYS, times):
        yield "{}'s {} has been moved to {} at {}.".format(n, k, d, t)


def sowing(rng):
    crops = {"radish": "in about four weeks", "carrot": "after ten to twelve weeks",
             "pea": "in early summer", "lettuce": "within six weeks",
             "bean": "about two months later", "beet": "in late summer",
             "spinach": "before it gets hot"}
    whens = ["in early spring", "after the last frost", "in a sunny raised bed",
             "in small batches every two weeks", "in pots on the balcony"]
    for (c, later), w in itertools.product(crops.items(), whens):
        yield "Sow {} seeds {} and harvest them {}.".format(c, w, later)


FAMILIES = [weather, journeys, routines, reviews, business, matches,
            cooking, software, opening_hours, pets, appointments, sowing]


def main():
    rng = random.Random(SEED)
    held_out = set()
    for name in ("minilm_eval.txt", "minilm_calib.txt"):
        path = HERE / name
        if path.exists():
            held_out.update(path.read_text(encoding="utf-8").splitlines())
    out, seen = [], set()

    def add(line):
        line = line.strip()
        if line and line not in seen and line not in held_out:
            seen.add(line)
            out.append(line)

    for line in HAND.splitlines():
        add(line)
    n_hand = len(out)
    for family in FAMILIES:
        lines = list(family(rng))
        rng.shuffle(lines)
        for line in lines[:PER_FAMILY]:
            add(line)
    (HERE / "minilm_train.txt").write_text("\n".join(out) + "\n", encoding="utf-8")
    print("minilm_train.txt: {} lines ({} hand-written, {} generated)".format(
        len(out), n_hand, len(out) - n_hand))


if __name__ == "__main__":
    main()
