"""The default general text for measuring forgetting (``data: {forgetting: default}``).

Seventy-one short paragraphs (about 3,200 words) of everyday English on unrelated subjects: nature, science, cooking, history, travel,
work, sport, the arts, health, money, technology and ordinary life. They were written for peft_magic (no corpus
was copied), so they ship with the package under its own license and work offline.

They are a small, generic probe: enough to see whether a fine-tuned model still predicts plain English about as
well as its base did, not a benchmark. For a sharper measure, use text close to what the model must keep
knowing (``forgetting: $my_texts`` or a file), ideally a few hundred paragraphs the model never trained on.
"""

from __future__ import annotations

PARAGRAPHS = (
    # nature and the living world
    (
        "Rivers carry far more than water. As they move downhill they pick up sand, clay and small stones, and they "
        "drop this load wherever the current slows, at a bend or where the river meets the sea. Over thousands of "
        "years these deposits build wide, flat valleys and deltas, which is one reason so many farms and cities sit "
        "beside rivers."
    ),
    (
        "Most trees that lose their leaves in autumn do so to save water and energy during the cold months. Before "
        "the leaves fall, the tree breaks down the green pigment and moves useful nutrients back into its branches. "
        "The yellow and orange colours that remain were in the leaf all summer, hidden by the green."
    ),
    (
        "Honeybees tell each other where to find food by dancing. A forager that has found a rich patch of flowers "
        "returns to the hive and walks a figure-eight pattern, waggling its body along the middle line. The angle "
        "of that line and the length of the waggle tell the other bees the direction and the distance to fly."
    ),
    (
        "A desert is defined by how little rain it receives, not by how hot it is. Some of the largest deserts on "
        "Earth are cold for much of the year, and the interior of Antarctica is among the driest places of all. "
        "Plants that live in dry regions often have small, waxy leaves or store water in thick stems."
    ),
    (
        "Octopuses are remarkable problem solvers. In aquariums they have been seen opening jars, escaping from "
        "tanks and recognising individual keepers. Much of their nervous system lies in their arms, so each arm can "
        "explore and react to its surroundings with a surprising degree of independence."
    ),
    (
        "Soil is alive. A single handful of healthy garden soil holds millions of bacteria, fungi and tiny animals "
        "that break down dead leaves and roots and release their nutrients for new plants. Earthworms mix the "
        "layers and leave channels that let air and water reach the roots."
    ),
    (
        "Many birds migrate thousands of kilometres each year between their breeding grounds and the places where "
        "they spend the winter. They find their way using the position of the sun and stars, the shape of the "
        "land, and, scientists believe, a sense of the Earth's magnetic field."
    ),
    (
        "Coral reefs are built by colonies of tiny animals that lay down skeletons of limestone. The corals share "
        "their tissues with microscopic algae that capture sunlight and give the reef much of its colour. When the "
        "water becomes too warm, the corals expel the algae and turn pale, an event known as bleaching."
    ),
    (
        "Mushrooms are only the visible fruit of a much larger organism. Beneath the ground, a fungus spreads as a "
        "web of fine threads that can cover a large area. Many of these networks connect to the roots of trees, "
        "trading minerals from the soil for sugars the trees make from sunlight."
    ),
    (
        "Thunder is the sound of air expanding suddenly as a bolt of lightning heats it. Because light travels much "
        "faster than sound, you see the flash first. Counting the seconds until the thunder arrives and dividing by "
        "three gives a rough distance to the storm in kilometres."
    ),
    # science and how things work
    (
        "A rainbow appears when sunlight enters raindrops, bends, reflects off the back of each drop and bends "
        "again on the way out. Each colour bends by a slightly different amount, so the white light spreads into a "
        "band of red, orange, yellow, green, blue and violet. You only see a rainbow with the sun behind you."
    ),
    (
        "Water boils at a lower temperature high in the mountains because the air pressure there is lower. That is "
        "why pasta takes longer to cook at altitude and why some recipes include special instructions for cooks "
        "who live far above sea level."
    ),
    (
        "The Moon always shows roughly the same face to the Earth. Over millions of years, the pull of the Earth "
        "slowed the Moon's spin until one rotation took exactly as long as one trip around our planet. The far side "
        "is not dark, though; it receives as much sunlight as the near side."
    ),
    (
        "Ice floats because water expands when it freezes. The molecules arrange themselves into an open pattern "
        "that takes up more space than liquid water, so ice is less dense. This matters for life: lakes freeze from "
        "the top down, and the layer of ice protects the water and the fish below."
    ),
    (
        "A lever lets a small force move a heavy load. The longer the distance between the point where you push and "
        "the pivot, the less effort you need. Scissors, bottle openers, wheelbarrows and even the bones of your arm "
        "all work as levers."
    ),
    (
        "Vaccines train the immune system by showing it a harmless piece or weakened form of a germ. The body "
        "learns to recognise the invader and keeps memory cells that can respond quickly if the real germ ever "
        "appears. This is why many vaccines protect people for years after a single course."
    ),
    (
        "Sound is a wave of pressure moving through air, water or solid material. It cannot travel through empty "
        "space, which is why the explosions in science fiction films would in reality be silent. Sound moves about "
        "four times faster in water than in air."
    ),
    (
        "The human heart beats roughly one hundred thousand times a day. Its right side sends blood to the lungs to "
        "collect oxygen, and its left side pumps that oxygen-rich blood out to the rest of the body. Valves inside "
        "the heart keep the blood flowing in one direction."
    ),
    (
        "Magnets have two poles, usually called north and south. Opposite poles attract and like poles repel. If "
        "you cut a bar magnet in half, you do not get a separate north and south piece; each half becomes a new "
        "magnet with two poles of its own."
    ),
    (
        "Plants make their own food through photosynthesis. Inside their leaves, they use the energy of sunlight to "
        "combine carbon dioxide from the air with water from the soil, producing sugar and releasing oxygen. Nearly "
        "all the oxygen we breathe comes from this process, on land and in the oceans."
    ),
    # cooking and food
    (
        "Bread rises because yeast, a tiny fungus, feeds on the sugars in flour and releases bubbles of carbon "
        "dioxide. Kneading develops stretchy strands of gluten that trap the gas, so the dough swells. In the oven "
        "the bubbles expand further before the crumb sets into its final shape."
    ),
    (
        "To make a simple vegetable soup, soften an onion, a carrot and a stick of celery in a little oil, add "
        "whatever vegetables you have, cover them with stock and simmer until everything is tender. Season at the "
        "end, when the flavours have come together, rather than at the start."
    ),
    (
        "Salt does more than make food taste salty. A small pinch can soften bitterness, make sweet flavours seem "
        "rounder and bring out the aroma of herbs. Bakers add salt to bread dough because it also strengthens the "
        "gluten and slows the yeast a little."
    ),
    (
        "Rice cooked by the absorption method needs a measured amount of water and a tight lid. Once the water "
        "boils, turn the heat very low and leave the pot alone. Lifting the lid lets the steam escape, and the "
        "grains on top may stay hard while the bottom scorches."
    ),
    (
        "Onions make people cry because cutting them breaks cells that release a compound which turns into an "
        "irritating gas. Chilling the onion first, using a sharp knife and working near an open window all help "
        "reduce the tears."
    ),
    (
        "Many cultures have a dish of dough wrapped around a filling: dumplings, ravioli, empanadas, samosas and "
        "pierogi are only a few. The idea travels well because it stretches a small amount of meat or vegetables "
        "into a filling meal and makes good use of leftovers."
    ),
    (
        "Coffee beans are the seeds of a red fruit that grows on shrubs in warm, hilly regions. After harvest, the "
        "seeds are dried and roasted. Light roasts keep more of the bean's fruity and acidic notes, while dark "
        "roasts taste bitter and smoky."
    ),
    (
        "Keeping a kitchen safe is mostly a matter of habits. Wash your hands before cooking, keep raw meat apart "
        "from food that will not be cooked, cool leftovers quickly and store them covered in the refrigerator. Use "
        "them within a few days."
    ),
    # history and society
    (
        "Before clocks were common, many towns kept time by the sun. Noon was the moment the sun stood highest, so "
        "each town's noon was a few minutes different from its neighbours'. Standard time zones became necessary "
        "when railways needed timetables that made sense across long distances."
    ),
    (
        "The printing press with movable type made books far cheaper to produce. Before it, most books were copied "
        "by hand, which took months. Once printing spread, ideas, news and instructions could reach many more "
        "readers, and more people had a reason to learn to read."
    ),
    (
        "Ancient roads were often built to move soldiers and goods quickly across an empire. Many were laid in "
        "layers of stone and gravel with a curved surface so that rain would run off to the sides. Some of these "
        "routes are still followed by modern highways."
    ),
    (
        "Markets have existed for as long as towns have. Farmers brought their produce to a central square on fixed "
        "days, and traders arrived with goods from farther away. A weekly market was also a place to hear the news, "
        "settle debts and meet friends."
    ),
    (
        "Public libraries lend books free of charge to anyone who lives nearby. Many also offer internet access, "
        "reading groups for children, language classes and quiet places to study. For some people the library is "
        "the only warm, calm public space open to everyone."
    ),
    (
        "Writing seems to have been invented several times in different parts of the world. Early systems were used "
        "for practical records such as counts of grain, livestock and taxes. Stories, letters and laws came later, "
        "once people saw what a written record could do."
    ),
    (
        "Lighthouses warned ships away from rocks and marked the entrance to harbours. Each one had its own pattern "
        "of flashes so that sailors could tell which light they were looking at. Today most are automatic, and "
        "satellite navigation does much of the work they once did."
    ),
    (
        "Elections let citizens choose who represents them. In most democracies the vote is secret, so that no one "
        "can be pressured or rewarded for choosing a particular candidate. Counting is usually done in public, with "
        "observers from different parties watching."
    ),
    # travel and places
    (
        "Travelling by train lets you watch the landscape change slowly. You can read, walk to the dining car or "
        "talk with the people sitting across from you. On long journeys, night trains with sleeping compartments "
        "turn the trip itself into part of the holiday."
    ),
    (
        "When you visit a new city, it helps to walk for the first day. You learn how the streets connect, where "
        "the markets and parks are, and which cafes the locals prefer. Public transport is easier to use once you "
        "have a picture of the city in your head."
    ),
    (
        "Mountain weather can change quickly. A clear morning may turn into fog, wind and cold rain by the "
        "afternoon. Experienced hikers start early, carry a warm layer and a waterproof jacket, and are not afraid "
        "to turn back before reaching the top."
    ),
    (
        "Islands often have plants and animals found nowhere else. Species that arrive by chance, carried by wind, "
        "birds or floating logs, slowly adapt to the local conditions. Without predators, some island birds lost "
        "the ability to fly."
    ),
    (
        "Packing light makes a trip easier. Choose clothes that go together, bring one pair of comfortable shoes "
        "for walking, and leave space for anything you might buy. A small bag is easier to carry on stairs, buses "
        "and crowded platforms."
    ),
    (
        "Ports are busy places where goods move between ships, trains and trucks. Most cargo today travels in steel "
        "containers of standard sizes, which cranes can lift straight from a ship onto a waiting vehicle. This "
        "change made shipping goods around the world much cheaper."
    ),
    # work, money and everyday life
    (
        "A budget is simply a plan for money. Write down what comes in each month and what goes out, starting with "
        "rent, food and bills. Whatever is left can be divided between savings and the things you enjoy. Even a "
        "rough plan makes surprises less painful."
    ),
    (
        "Interest works in two directions. When you save, the bank pays you a little for the use of your money, and "
        "over many years the interest itself earns interest. When you borrow, the same arithmetic works against "
        "you, which is why paying off expensive debt early is usually wise."
    ),
    (
        "Good meetings have a clear purpose and end on time. Send a short agenda in advance, invite only the people "
        "who need to be there, and finish by agreeing who will do what next. Many questions can be settled by a "
        "short message instead."
    ),
    (
        "Learning a new skill takes regular practice more than long sessions. Twenty minutes a day for a month "
        "usually does more than a whole weekend once. Mistakes are part of the process; they show you exactly what "
        "to practise next."
    ),
    (
        "Sleep affects memory, mood and health. Most adults need between seven and nine hours a night. Keeping a "
        "regular bedtime, avoiding bright screens late in the evening and keeping the bedroom cool and dark can all "
        "make it easier to fall asleep."
    ),
    (
        "A small garden on a balcony can produce a surprising amount of food. Herbs, lettuce, tomatoes and beans "
        "grow well in pots if they get enough sun and water. Watering in the early morning means less is lost to "
        "evaporation during the day."
    ),
    (
        "Moving to a new home is tiring even when it is a happy change. Label each box with the room it belongs in, "
        "keep a separate bag with the things you will need on the first night, and take photographs of how "
        "electronics are connected before you unplug them."
    ),
    (
        "Repairing things instead of throwing them away saves money and resources. A loose chair leg, a torn seam or "
        "a dripping tap can often be fixed in an afternoon with simple tools. Community repair cafes let people "
        "learn these skills from volunteers."
    ),
    (
        "Writing a clear letter of complaint works better than an angry one. Say what happened, when it happened and "
        "what you would like the company to do. Keep copies of receipts and messages, and give them a reasonable "
        "time to reply."
    ),
    # sport and games
    (
        "Football is played in almost every country, in stadiums and on dusty streets alike. All it really needs is "
        "a ball and something to mark the goals. Its simple rules are part of the reason it spread so widely."
    ),
    (
        "Chess is a game of complete information: both players can see every piece on the board. Even so, the number "
        "of possible games is so large that no one has explored more than a tiny fraction of them. Beginners improve "
        "quickly by learning a few basic patterns."
    ),
    (
        "Long-distance runners train their bodies to use oxygen efficiently. Most of their weekly running is done at "
        "an easy pace, with only a few hard sessions. Rest days matter too, because muscles grow stronger while they "
        "recover, not while they work."
    ),
    (
        "Swimming is one of the few sports that works almost every muscle while putting little strain on the joints. "
        "That makes it popular with people recovering from injuries and with older adults who want to stay active. "
        "Learning to breathe calmly is the first step."
    ),
    (
        "Card games have been played for centuries, and the same deck can be used for hundreds of different games. "
        "Some depend mostly on luck, others on memory and careful planning. Playing cards is a good way to pass a "
        "rainy afternoon with friends."
    ),
    (
        "Cycling to work is cheap, quiet and good for your health. A bicycle needs little more than air in the "
        "tyres, a clean and oiled chain, and brakes that work. Lights and bright clothing make you easier to see "
        "in the dark."
    ),
    # arts and culture
    (
        "A good story usually begins with someone who wants something and cannot easily get it. The obstacles in "
        "their way create tension, and the choices they make under pressure show who they really are. Readers keep "
        "turning the pages to find out what happens next."
    ),
    (
        "Music can be written down in many ways, but the most common system uses five horizontal lines. The "
        "position of each note on the lines shows its pitch, and its shape shows how long it should last. With "
        "practice, musicians read this notation as fluently as words."
    ),
    (
        "Painters have long used tricks to suggest depth on a flat surface. Objects in the distance are drawn "
        "smaller, higher on the canvas and with softer, bluer colours. Lines that are parallel in reality meet at "
        "a point on the horizon."
    ),
    (
        "Museums do more than display objects. Their staff study, clean and repair the collections, keep records of "
        "where each piece came from, and control the light and humidity in the rooms so that fragile materials last "
        "longer."
    ),
    (
        "Poetry often says a great deal in very few words. Rhythm, rhyme and unexpected images make a poem "
        "memorable, which is why so many people still know verses they learned as children. Reading a poem aloud "
        "often makes its meaning clearer."
    ),
    (
        "Theatre depends on an agreement between actors and audience. Everyone knows the stage is not really a "
        "castle or a kitchen, yet for two hours they choose to believe it. A few props, good lighting and a strong "
        "performance are usually enough."
    ),
    (
        "Photography changed how people remembered their lives. Once cameras became cheap, families could keep "
        "pictures of birthdays, holidays and ordinary afternoons. Today most photographs are taken with phones, and "
        "far more are taken than anyone will ever look at."
    ),
    # technology
    (
        "A computer stores everything, from letters to songs, as long sequences of ones and zeros. Programs tell the "
        "processor how to move and combine these numbers. What seems like one simple action on the screen may "
        "involve millions of tiny steps."
    ),
    (
        "Passwords are safer when they are long and different for every account. A sentence of several unrelated "
        "words is easier to remember than a short string of symbols and harder to guess. A password manager can "
        "remember the rest."
    ),
    (
        "Batteries store energy as chemical differences between two materials. When a device is switched on, the "
        "chemical reaction pushes electrons through the circuit. Rechargeable batteries reverse the reaction when "
        "they are plugged in, although they slowly wear out over many cycles."
    ),
    (
        "The internet is a network of networks. When you open a web page, your request is broken into small packets "
        "that may travel by different routes through cables and radio links before they are put back together at "
        "the other end."
    ),
    (
        "Maps on a phone combine satellite positioning with stored information about roads. The phone receives "
        "signals from several satellites and works out its position from the tiny differences in the time each "
        "signal took to arrive."
    ),
    (
        "Early calculators were large machines with gears and levers. Electronic calculators appeared in the second "
        "half of the twentieth century and quickly became small and cheap enough to fit in a pocket, changing how "
        "arithmetic was taught in schools."
    ),
    (
        "Robots in factories are very good at repeating the same precise movement thousands of times. Tasks that "
        "change from one moment to the next, such as folding laundry or tidying a room, are still surprisingly "
        "difficult for machines."
    ),
)

NAME = f"peft_magic's built-in general text ({len(PARAGRAPHS)} paragraphs)"
